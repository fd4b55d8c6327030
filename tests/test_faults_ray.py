"""Faults in a real Ray Train run (2 workers, DeepSpeed ZeRO-2 on CPU), with nothing lost: a worker that gets
SIGTERM checkpoints and the group restarts from there, a worker killed outright restarts the group from the
latest checkpoint (the default ``scaling.max_failures``), a group lost after its final checkpoint (while rank 0
logs the final figures) runs the final stage again, and non-finite losses on one rank are dropped on both, then
stop the run at its last good checkpoint. Every step is in MLflow's history once."""

from __future__ import annotations

import json
import math

import pytest
from helpers import experiment_runs, metric_history, metric_steps
from mlflow.tracking import MlflowClient

from maskray.checkpoint import checkpoint_step, latest_checkpoint
from maskray.engine.driver import run_pretraining
from maskray.errors import TrainingStopped

pytestmark = pytest.mark.slow

SMALL = ("eval.train_shards=null", "optim.warmup_steps=2", "data.batch_size=16")


def test_lost_workers_restart_from_their_checkpoints_and_every_step_is_logged_once(
    ray_session, demo_config, tmp_path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    # rank 1 gets SIGTERM during step 5 (it checkpoints at 5), then SIGKILL during step 14 (latest checkpoint: 12);
    # rank 0 is killed while it logs the final figures, after the step-16 checkpoint
    faults = ("[{step: 4, rank: 1, signal: SIGTERM}, {step: 13, rank: 1, signal: SIGKILL}, "
              "{step: 0, rank: 0, signal: SIGKILL, at: figures}]")
    config = demo_config(tmp_path, *SMALL, "objective.name=fault_mae", f"objective.faults={faults}",
                         f"objective.marker_dir={markers}", "train.steps=16", "train.log_every=2",
                         "train.checkpoint_every=4")
    assert config.scaling.max_failures == 3  # the default
    result = run_pretraining(config, run_name="lossy")

    resumed = {name: json.loads((markers / f"{name}_rank0.json").read_text())["step"] for name in ("resumed0",
                                                                                                  "resumed1")}
    assert resumed == {"resumed0": 5, "resumed1": 12}  # 0-based: the first step after each checkpoint
    assert (markers / "fault2").exists()  # the final-stage kill fired
    loss = metric_history(config, result.run_id, "loss")
    assert [step for step, _ in loss] == [2, 4, 5, 6, 8, 10, 12, 14, 16]  # 5: the SIGTERM checkpoint
    assert all(math.isfinite(value) for _, value in loss)
    assert metric_steps(config, result.run_id, "lr") == [2, 4, 5, 6, 8, 10, 12, 14, 16]
    # the restarted group had no step left to train but still logged the final stage (figures, encoder)
    artifacts = {item.path for item in MlflowClient(config.tracking.resolved_uri()).list_artifacts(result.run_id)}
    assert {"reconstructions.png", "loss_curve.png", "encoder"} <= artifacts
    runs = experiment_runs(config)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert checkpoint_step(latest_checkpoint(tmp_path / "runs" / "lossy")) == 16


def test_non_finite_losses_on_one_rank_are_dropped_on_all_then_stop_the_run(ray_session, demo_config, tmp_path) -> None:
    # rank 1 only: one NaN batch at step 2 (dropped), then NaN for good from step 8 (3 in a row stop the run)
    config = demo_config(tmp_path, *SMALL, "objective.name=nan_mae", "objective.nan_at={1: 1, 7: 100}",
                         "objective.nan_rank=1", "data.num_workers=0", "train.max_bad_batches=3", "train.steps=10",
                         "train.log_every=1", "train.checkpoint_every=3")
    with pytest.raises(TrainingStopped, match="train.max_bad_batches: 3 consecutive batches had a non-finite loss "
                                              "at step 8; the latest checkpoint is the last good one"):
        run_pretraining(config, run_name="nan")
    run = experiment_runs(config)[0]
    loss = metric_history(config, run.info.run_id, "loss")
    assert [step for step, _ in loss] == [1, 2, 3, 4, 5, 6]  # up to the last checkpoint
    assert all(math.isfinite(value) for _, value in loss)
    assert metric_history(config, run.info.run_id, "bad_batches") == [(1, 0), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]
    assert run.info.status == "FAILED"
    assert checkpoint_step(latest_checkpoint(tmp_path / "runs" / "nan")) == 6
