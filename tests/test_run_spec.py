"""The run specification and fail fast: every check that needs model, data and objective together runs once in
the driver (exit 2 with one line naming the key, before Ray starts); a user error on any worker ends the run in one
attempt with exit 2; teachers are pinned by sha256; the spec travels to the workers as is."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from helpers import REPO, launch, spawn_two, tiny_tokenizer

from maskray.config import load_config
from maskray.errors import ConfigError, DataError
from maskray.run_spec import build_run_spec
from maskray.teacher_sources import TeacherSpec, build_teacher

DEMO = REPO / "configs" / "demo"
RANDOM_TEACHER = "{source: random, arch: vit_tiny_patch16_224, model_kwargs: {patch_size: 4, depth: 2}"


def _data(shards: Path) -> list[str]:
    return [f"data.shards={shards / 'train'}", f"eval.train_shards={shards / 'train'}",
            f"eval.test_shards={shards / 'test'}"]


def _cases(tokenizer: Path) -> dict[str, tuple[str, list[str], str]]:
    """name -> (demo config, "" for the defaults; overrides; the error line's start)."""
    return {
        "simmim mask_block": ("simmim", ["objective.mask_block=3"], "error: key 'objective.mask_block': 3 does not "
                                                                    "tile the 8x8 patch grid"),
        "msn focal_size": ("msn", ["objective.focal_views=2", "objective.focal_size=6"],
                           "error: key 'objective.focal_size': 6 is not a multiple of model.patch_size 4"),
        "dtm teacher grid": ("dtm", [f"objective.teacher={RANDOM_TEACHER}, img_size: 16}}"],
                             "error: key 'objective.teacher.img_size': the teacher's 4x4 patch grid"),
        "beitv2 num_masked": ("beitv2", [f"objective.tokenizer.path={tokenizer}", "objective.num_masked=1000"],
                              "error: key 'objective.num_masked': 1000 exceeds the encoder's 64 patches"),
        "composite part key": ("", ["objective.name=composite",
                                       "objective.parts=[{name: mae}, {name: simmim, mask_block: 3}]"],
                               "error: key 'objective.parts[1].mask_block': 3 does not tile"),
        "composite part unknown key": ("", ["objective.name=composite", "objective.parts=[{name: mae}, "
                                               "{name: mae, bogus: 1}]"],
                                       "error: unknown key 'objective.parts[1].bogus'"),
        "vqkd teacher file": ("vqkd", ["objective.teacher.path=/nonexistent/teacher.safetensors"],
                              "error: key 'objective.teacher.path': no such file '/nonexistent/teacher.safetensors'"),
    }


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tok", img_size=32, num_codes=16)


@pytest.mark.parametrize("case", list(_cases(Path("tok"))))
def test_a_bad_setting_exits_2_with_one_line_before_ray_starts(case, demo_shards, tokenizer, tmp_path, monkeypatch,
                                                              capsys) -> None:
    import ray

    import maskray.engine.driver as driver

    def no_ray() -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "ensure_ray", no_ray)
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # the launcher's; a shared test Ray stays up
    monkeypatch.setenv("MASKRAY_ROOT", str(tmp_path))
    name, overrides, expected = _cases(tokenizer)[case]
    args = ["--config", str(DEMO / f"{name}.yaml")] if name else []
    for override in [*_data(demo_shards), *overrides]:
        args += ["--set", override]
    capsys.readouterr()
    assert launch("pretrain.py", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_the_spec_holds_typed_params_pinned_teachers_and_travels_as_is(demo_shards) -> None:
    config = load_config(DEMO / "dtm.yaml", [*_data(demo_shards), f"objective.teacher={RANDOM_TEACHER}}}"])
    spec = build_run_spec(config)
    assert type(spec.objective).__name__ == "DTMParams" and spec.objective.teacher.sha256 is not None
    assert spec.params["objective.teacher.sha256"] == spec.objective.teacher.sha256
    assert "sha256" not in spec.config.objective.params["teacher"]  # the config records what the user gave
    travelled = pickle.loads(pickle.dumps(spec))
    assert travelled.objective == spec.objective and travelled.config == spec.config
    composite = build_run_spec(load_config(None, [*_data(demo_shards), "objective.name=composite",
                                                  "objective.parts=[{name: mae, weight: 2}, {name: simmim}]"]))
    parts = composite.objective.parts
    assert [type(part.params).__name__ for part in parts] == ["MAEParams", "SimMIMParams"] and parts[0].weight == 2
    assert composite.config.objective.params["parts"][0] == {"name": "mae", "weight": 2.0}  # dumped inline


def test_a_worker_refuses_a_teacher_whose_weights_changed() -> None:
    spec = TeacherSpec(source="random", arch="vit_tiny_patch16_224", model_kwargs={"patch_size": 4, "depth": 1})
    teacher = build_teacher(spec, img_size=16)
    assert build_teacher(spec.model_copy(update={"sha256": teacher.sha256}), img_size=16).sha256 == teacher.sha256
    other = spec.model_copy(update={"seed": 1, "sha256": teacher.sha256})  # other weights than the driver pinned
    with pytest.raises(ConfigError, match=r"key 'objective.teacher.sha256': the teacher's weights .* hash to"):
        build_teacher(other, img_size=16)


def _agree_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from maskray.engine.fail_fast import RunFailed, failing_together

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    outcomes = []
    for failing_rank in (None, 1, 0):
        try:
            with failing_together(torch.device("cpu")):
                if rank == failing_rank:
                    raise DataError(f"data.shards: rank {rank} is out of shards\nsecond line")
            outcomes.append("ok")
        except RunFailed as failed:
            outcomes.append(f"{type(failed.error).__name__}: {failed.error}")
    with failing_together(torch.device("cpu")):  # the group still works after an agreed failure
        dist.barrier()
    results[rank] = outcomes
    dist.destroy_process_group()


def test_ranks_agree_on_an_error_that_only_one_of_them_raised() -> None:
    results = spawn_two(_agree_worker)
    expected = ["ok", "DataError: second line", "DataError: second line"]  # multi-line: its last line
    assert results == {0: expected, 1: expected}


def test_one_line_of_an_error_from_a_loader_process() -> None:
    from maskray.engine.fail_fast import one_line

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File ...\nmaskray.errors.DataError: data.shards: shard 'a.tar' is gone\n")
    assert str(one_line(wrapped)) == "data.shards: shard 'a.tar' is gone"
    assert one_line(plain := ConfigError("key 'x': bad")) is plain


@pytest.mark.slow
def test_a_config_error_on_one_worker_ends_the_run_in_one_attempt(ray_session, demo_shards, tmp_path, monkeypatch,
                                                                  capsys) -> None:
    """Rank 1 raises a ConfigError while building its objective (the driver's build passes): every rank stops
    together, Ray Train does not restart the group (``scaling.max_failures: 3``), the launcher exits 2 with the
    error's line and the MLflow run is FAILED."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(ray_session, "shutdown", lambda: None)  # the launcher's; the tests' Ray stays up
    attempts = tmp_path / "attempts.txt"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", str(DEMO / "mae.yaml"), "--run-name", "worker-error", "--set", "objective.name=worker_error",
            "--set", f"objective.attempts_file={attempts}", "--set", "scaling.max_failures=3", "--set",
            f"tracking.uri={uri}", "--set", f"tracking.storage_path={tmp_path / 'runs'}", "--set", "train.steps=2"]
    for override in _data(demo_shards):
        args += ["--set", override]
    capsys.readouterr()
    assert launch("pretrain.py", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: key 'objective.rank': worker rank 1 refuses to build", err[-5:]
    assert sorted(attempts.read_text().splitlines()) == ["rank 0", "rank 1"]  # one attempt of the two workers
    client = MlflowClient(uri)
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert [(run.info.run_name, run.info.status) for run in runs] == [("worker-error", "FAILED")]
