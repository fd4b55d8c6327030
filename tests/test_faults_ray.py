"""Faults in a real Ray Train run (2 workers, DeepSpeed ZeRO-2 on CPU), with nothing lost: a worker that gets
SIGTERM checkpoints and the group restarts from there, a worker killed outright restarts the group from the
latest checkpoint (the default ``scaling.max_failures``), and non-finite losses on one rank are dropped on both,
then stop the run at its last good checkpoint. Every step is in MLflow's history once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from maskray.checkpoint import checkpoint_step, latest_checkpoint
from maskray.config import load_config
from maskray.engine.driver import run_pretraining
from maskray.errors import TrainingStopped

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _config(demo_shards, tmp_path, *extra: str):
    return load_config(REPO / "configs/demo/mae.yaml", [
        f"data.shards={demo_shards / 'train'}", "eval.train_shards=null",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.storage_path={tmp_path / 'runs'}",
        "optim.warmup_steps=2", "data.batch_size=16", *extra,
    ])


def _history(config, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(config.tracking.resolved_uri()).get_metric_history(run_id, key)]


def test_lost_workers_restart_from_their_checkpoints_and_every_step_is_logged_once(
    ray_session, demo_shards, tmp_path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    # rank 1 gets SIGTERM during step 5 (it checkpoints at 5), then SIGKILL during step 14 (latest checkpoint: 12)
    faults = "[{step: 4, rank: 1, signal: SIGTERM}, {step: 13, rank: 1, signal: SIGKILL}]"
    config = _config(demo_shards, tmp_path, "objective.name=fault_mae", f"objective.faults={faults}",
                     f"objective.marker_dir={markers}", "train.steps=16", "train.log_every=2",
                     "train.checkpoint_every=4")
    assert config.scaling.max_failures == 3  # the default
    result = run_pretraining(config, run_name="lossy")

    resumed = {name: json.loads((markers / f"{name}_rank0.json").read_text())["step"] for name in ("resumed0",
                                                                                                  "resumed1")}
    assert resumed == {"resumed0": 5, "resumed1": 12}  # 0-based: the first step after each checkpoint
    loss = _history(config, result.run_id, "loss")
    assert [step for step, _ in loss] == [2, 4, 5, 6, 8, 10, 12, 14, 16]  # 5: the SIGTERM checkpoint
    assert all(math.isfinite(value) for _, value in loss)
    assert [step for step, _ in _history(config, result.run_id, "lr")] == [2, 4, 5, 6, 8, 10, 12, 14, 16]
    client = MlflowClient(config.tracking.resolved_uri())
    runs = client.search_runs([client.get_experiment_by_name("maskray-demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert checkpoint_step(latest_checkpoint(tmp_path / "runs" / "lossy")) == 16


def test_non_finite_losses_on_one_rank_are_dropped_on_all_then_stop_the_run(ray_session, demo_shards, tmp_path) -> None:
    # rank 1 only: one NaN batch at step 2 (dropped), then NaN for good from step 8 (3 in a row stop the run)
    config = _config(demo_shards, tmp_path, "objective.name=nan_mae", "objective.nan_at={1: 1, 7: 100}",
                     "objective.nan_rank=1", "train.max_bad_batches=3", "train.steps=10", "train.log_every=1",
                     "train.checkpoint_every=3")
    with pytest.raises(TrainingStopped, match="train.max_bad_batches: 3 consecutive batches had a non-finite loss "
                                              "at step 8; the latest checkpoint is the last good one"):
        run_pretraining(config, run_name="nan")
    client = MlflowClient(config.tracking.resolved_uri())
    run = client.search_runs([client.get_experiment_by_name("maskray-demo").experiment_id])[0]
    loss = _history(config, run.info.run_id, "loss")
    assert [step for step, _ in loss] == [1, 2, 3, 4, 5, 6]  # up to the last checkpoint
    assert all(math.isfinite(value) for _, value in loss)
    assert _history(config, run.info.run_id, "bad_batches") == [(1, 0), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]
    assert run.info.status == "FAILED"
    assert checkpoint_step(latest_checkpoint(tmp_path / "runs" / "nan")) == 6


def test_a_group_lost_after_its_final_checkpoint_runs_the_final_stage_again(ray_session, demo_shards, tmp_path) -> None:
    """Rank 0 is killed while it logs the final figures (after the step-4 checkpoint): the restarted group has no
    step left to train but still logs the final stage (figures, encoder), in the same FINISHED run."""
    markers = tmp_path / "markers"
    markers.mkdir()
    config = _config(demo_shards, tmp_path, "objective.name=fault_mae", f"objective.marker_dir={markers}",
                     "objective.faults=[{step: 0, rank: 0, signal: SIGKILL, at: figures}]", "train.steps=4",
                     "train.log_every=2", "train.checkpoint_every=4")
    result = run_pretraining(config, run_name="final-stage")

    assert (markers / "fault0").exists()
    client = MlflowClient(config.tracking.resolved_uri())
    artifacts = {item.path for item in client.list_artifacts(result.run_id)}
    assert {"reconstructions.png", "loss_curve.png", "encoder"} <= artifacts
    assert [step for step, _ in _history(config, result.run_id, "loss")] == [2, 4]
    runs = client.search_runs([client.get_experiment_by_name("maskray-demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
