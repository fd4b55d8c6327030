"""Grid sweeps: the grid and its validation, trial resources, and (slow) Ray Tune sweeps of the demo whose trials
are MLflow runs nested under the sweep's run, one failing trial not losing the others."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import launch, own_lines
from mlflow.tracking import MlflowClient

from maskray.config import load_config
from maskray.engine.sweep import default_concurrency, parse_grid, plan_trials, run_sweep
from maskray.errors import ConfigError, DataError
from maskray.tracking.compare import KIND_TAG, PARENT_TAG, SWEEP_TAG, compare_runs, format_table

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/demo/mae.yaml")


def _overrides(demo_shards, tmp_path, *extra: str) -> list[str]:
    return [
        f"data.shards={demo_shards / 'train'}", "eval.train_shards=null", "eval.test_shards=null",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.storage_path={tmp_path / 'runs'}",
        "tracking.experiment=sweeps", "scaling.workers=1", "data.num_workers=0", "data.batch_size=8",
        "train.steps=2", "train.log_every=1", "train.checkpoint_every=2", "optim.warmup_steps=1", *extra,
    ]


def test_grid_values_split_on_top_level_commas() -> None:
    grid = parse_grid(["objective.mask_ratio=0.5, 0.75", "data.mean=[0.5],[0.4]", "objective={name: mae, x: 1},y"])
    assert grid == {"objective.mask_ratio": ["0.5", "0.75"], "data.mean": ["[0.5]", "[0.4]"],
                    "objective": ["{name: mae, x: 1}", "y"]}
    for bad, match in (("objective.mask_ratio", "expected key=value"), ("a=1,,2", "empty value"),
                       ("a=1,1", "repeated value")):
        with pytest.raises(ConfigError, match=match):
            parse_grid([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["a=1,2", "a=3"])


def test_every_combination_is_validated_before_any_trial(demo_shards, tmp_path) -> None:
    overrides = _overrides(demo_shards, tmp_path)
    grid = parse_grid(["objective.mask_ratio=0.5,0.75", "optim.blr=1e-3,2e-3"])
    base, trials = plan_trials(CONFIG, overrides, grid, "s")
    assert [trial.run_name for trial in trials] == ["s-0", "s-1", "s-2", "s-3"]
    assert [(t.config["objective"]["mask_ratio"], t.config["optim"]["blr"]) for t in trials] == [
        (0.5, 1e-3), (0.5, 2e-3), (0.75, 1e-3), (0.75, 2e-3)]
    assert trials[3].describe() == "objective.mask_ratio=0.75 optim.blr=2e-3"
    assert base.tracking.experiment == "sweeps"

    with pytest.raises(ConfigError, match=r"^--grid objective\.mask_ratio=1\.5: .*key 'objective\.mask_ratio'"):
        plan_trials(CONFIG, overrides, parse_grid(["optim.blr=1e-3,2e-3", "objective.mask_ratio=0.5,1.5"]), "s")
    with pytest.raises(ConfigError, match=r"^--grid objective\.name=nope: .*objective\.name"):
        plan_trials(CONFIG, overrides, parse_grid(["objective.name=mae,nope"]), "s")
    with pytest.raises(DataError, match=r"^--grid data\.shards=/nonexistent: data\.shards"):
        plan_trials(CONFIG, overrides, parse_grid(["data.shards=/nonexistent"]), "s")
    with pytest.raises(ConfigError, match=r"share tracking\.experiment"):
        plan_trials(CONFIG, overrides, parse_grid(["tracking.experiment=a,b"]), "s")


def test_a_bad_grid_value_stops_the_launcher_with_one_line(demo_shards, tmp_path, capsys) -> None:
    sets = [arg for override in _overrides(demo_shards, tmp_path) for arg in ("--set", override)]
    assert launch("sweep.py", "--config", CONFIG, *sets, "--grid", "objective.mask_ratio=0.5,2") == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: --grid objective.mask_ratio=2: "), err
    assert not (tmp_path / "mlflow.db").exists()  # nothing was created


def test_default_concurrency_fits_the_trials_workers() -> None:
    configs = [load_config(CONFIG, ["scaling.workers=1"]), load_config(CONFIG, ["scaling.workers=2"])]
    assert default_concurrency(configs, {"CPU": 2.0}) == 1
    assert default_concurrency(configs[:1], {"CPU": 2.0}) == 2
    assert default_concurrency(configs, {"CPU": 1.0}) == 1  # never 0: such a trial waits for resources
    assert default_concurrency(configs, {"CPU": 16.0, "GPU": 4.0}) == 2
    assert default_concurrency([load_config(CONFIG, ["scaling.use_gpu=false"])], {"CPU": 16.0, "GPU": 4.0}) == 8


def test_compare_shows_sweep_trials_but_not_evaluations_or_the_sweep_run(tmp_path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment_id = client.create_experiment("cmp")
    plain = client.create_run(experiment_id, run_name="plain", tags={"objective": "mae"}).info.run_id
    client.create_run(experiment_id, run_name="plain-knn", tags={PARENT_TAG: plain, "maskray.eval": "knn"})
    sweep = client.create_run(experiment_id, run_name="s", tags={KIND_TAG: "sweep", SWEEP_TAG: "s"}).info.run_id
    for index, ratio in enumerate(("0.5", "0.75")):
        run_id = client.create_run(experiment_id, run_name=f"s-{index}", tags={PARENT_TAG: sweep, SWEEP_TAG: "s"})
        client.log_param(run_id.info.run_id, "objective.mask_ratio", ratio)
    assert sorted(row.name for row in compare_runs(store, "cmp")) == ["plain", "s-0", "s-1"]
    rows = compare_runs(store, "cmp", parent_run_id=sweep)
    assert sorted(row.name for row in rows) == ["s-0", "s-1"]
    table = format_table(sorted(rows, key=lambda row: row.name), params=("objective.mask_ratio", "optim.blr"))
    assert [line.split()[:3] for line in table.splitlines()[2:]] == [["s-0", "0.5", "-"], ["s-1", "0.75", "-"]]


@pytest.mark.slow
def test_sweep_trials_are_runs_under_one_parent_and_a_failing_trial_loses_no_other(
    ray_session, demo_shards, tmp_path
) -> None:
    """One sweep of two trials, side by side (a 2 x 1 grid; the grid's product: plan_trials above), one of which
    raises on its worker."""
    grid = parse_grid(["objective.fail=false,true", "objective.mask_ratio=0.6"])
    # max_failures 0: the failure is deterministic, restarting the trial's workers would only repeat it
    overrides = _overrides(demo_shards, tmp_path, "objective.name=failing_mae", "scaling.max_failures=0")
    base, trials = plan_trials(CONFIG, overrides, grid, "grid")
    result = run_sweep(base, trials, grid, "grid", tmp_path / "sweep.png")
    assert [trial.run_name for trial in result.finished] == ["grid-0"]
    assert [(trial.run_name, reason) for trial, reason in result.failed] == [
        ("grid-1", "RuntimeError: failing_mae: objective.fail is set")]

    client = MlflowClient(base.tracking.resolved_uri())
    experiment_id = client.get_experiment_by_name("sweeps").experiment_id
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "grid"
    assert parent.data.tags[KIND_TAG] == "sweep" and parent.data.tags[SWEEP_TAG] == "grid"
    assert parent.data.tags["maskray.sweep_failed"] == "grid-1"
    assert parent.data.params == {"grid.objective.fail": "false,true", "grid.objective.mask_ratio": "0.6",
                                  "sweep.trials": "2"}
    assert {a.path for a in client.list_artifacts(result.parent_run_id)} == {"comparison.png", "comparison.txt"}

    children = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'")
    by_name = {run.info.run_name: run for run in children}
    assert {name: run.info.status for name, run in by_name.items()} == {"grid-0": "FINISHED", "grid-1": "FAILED"}
    for trial in trials:
        run = by_name[trial.run_name]
        assert run.data.tags[SWEEP_TAG] == "grid" and run.data.params["objective.mask_ratio"] == "0.6"
        assert run.data.params["objective.fail"] == str(trial.config["objective"]["fail"])
    assert [m.step for m in client.get_metric_history(by_name["grid-0"].info.run_id, "loss")] == [1, 2]

    lines = result.table.splitlines()
    assert lines[0].split()[:3] == ["run", "objective.fail", "objective.mask_ratio"]
    assert (tmp_path / "sweep.png").stat().st_size > 0
    # the experiment's plain comparison shows the trials too, never the sweep run itself
    assert "grid" not in {row.name for row in compare_runs(base.tracking.resolved_uri(), "sweeps")}
    with pytest.raises(ConfigError, match="already has a run named 'grid'"):
        run_sweep(base, trials, grid, "grid", tmp_path / "again.png")
