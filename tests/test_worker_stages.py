"""The worker loop's stages, each run on its own in this process (no Ray): set-up from the run specification, the
baseline k-NN, one optimizer step and its log window, the periodic k-NN, the final stage. The step's module imports
neither Ray, MLflow nor matplotlib."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from maskray.context import StepContext
from maskray.engine import worker
from maskray.engine.step import optimizer_step
from maskray.engine.worker import WorkerRun
from maskray.run_spec import build_run_spec
from maskray.tracking import find_or_create_run


class _Context:
    """What set-up reads of Ray Train's worker context, for one rank."""

    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_experiment_name(self) -> str:
        return "stages"


@pytest.fixture
def worker_run(process_group, demo_config, tmp_path, monkeypatch) -> WorkerRun:
    """Set-up of a one-rank MAE run on the demo shards (its SIGTERM handler needs a Ray actor: left out)."""
    monkeypatch.setattr(worker, "install_worker_sigterm", lambda: None)
    config = demo_config(tmp_path, "data.num_workers=0", "data.batch_size=16", "scaling.workers=1", "train.steps=3")
    spec = build_run_spec(config)
    run_id, _ = find_or_create_run(spec.config.tracking.uri, "stages", "r", spec.params, spec.tags)
    loop_config = {"mlflow_run_id": run_id, "tracking_uri": spec.config.tracking.uri, "device": torch.device("cpu")}
    return WorkerRun.set_up(spec, loop_config, _Context(), checkpoint=None)


def test_each_stage_runs_on_its_own(worker_run: WorkerRun) -> None:
    run = worker_run
    assert (run.start, run.last_step, run.engine.zero_optimization_stage()) == (0, 3, 0)
    run.baseline()
    ctx = StepContext(0, 3, generator=run.randomness.generator)
    record = optimizer_step(run.engine, run.objective, run.batches, ctx, accum=1, device=run.device, dtype=run.dtype)
    assert record.images == 16 and torch.isfinite(torch.tensor(record.loss))
    run.stats.add(record, busy=0.1)
    assert run.log_window(1) is False  # the data is healthy
    run.evaluate(run.objective.encoder.timm_state_dict(), 1)
    run.held.flush()
    run.final_stage()
    client = MlflowClient(run.logger.tracking_uri)
    history = {name: [(m.step, m.value) for m in client.get_metric_history(run.run_id, name)]
               for name in ("loss", "knn_top1_random_init", "knn_top1")}
    assert history["loss"] == [(1, pytest.approx(record.loss))]
    assert [step for step, _ in history["knn_top1_random_init"]] == [0]
    assert [step for step, _ in history["knn_top1"]] == [1, 3]  # the periodic one, then the final stage's
    artifacts = {item.path for item in client.list_artifacts(run.run_id)}
    assert {"encoder", "loss_curve.png", "reconstructions.png"} <= artifacts


def test_the_step_imports_neither_ray_mlflow_nor_matplotlib() -> None:
    """Nor does the worker loop until rank 0 logs: the other ranks never import MLflow or matplotlib."""
    code = ("import sys; import maskray.engine.step, maskray.engine.deepspeed_setup; "
            "top = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'matplotlib'}); "
            "print(top()); import maskray.engine.worker; print(top())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["[]", "[]"]
