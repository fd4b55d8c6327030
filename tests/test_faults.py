"""Fault handling without Ray: non-finite losses dropped before their backward, MLflow metrics held until a
checkpoint and never logged twice, a resume under another world size refused before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import launch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from maskray.checkpoint import CONFIG_FILE, DEEPSPEED_DIR, ENCODER_FILE
from maskray.config import load_config
from maskray.context import StepContext
from maskray.engine.metric_log import HeldMetrics
from maskray.errors import ConfigError
from maskray.models import build_encoder
from maskray.objective import build_objective
from maskray.tracking import RunLogger, find_or_create_run

REPO = Path(__file__).resolve().parents[1]


# --- non-finite losses ---------------------------------------------------------------------------------------------
def _nan_engine(*overrides: str):
    from maskray.engine.deepspeed_setup import build_engine

    config = load_config(None, ["objective.name=nan_mae", "data.batch_size=4", "train.steps=10",
                                "optim.warmup_steps=1", *overrides])
    torch.manual_seed(0)
    objective = build_objective(config.objective.name, config.objective.params, build_encoder(config.model))
    return objective, build_engine(objective, config, world_size=1, bf16=False)


def _batches():
    generator = torch.Generator().manual_seed(0)
    while True:
        yield {"image": torch.randn(4, 3, 16, 16, generator=generator), "key": [str(i) for i in range(4)]}


def _state(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def test_a_non_finite_batch_is_dropped_before_its_backward(process_group, one_thread) -> None:
    from maskray.engine.step import optimizer_step

    objective, engine = _nan_engine("objective.nan_at={0: 2}")
    before = _state(engine)
    ctx = StepContext(0, 10, generator=torch.Generator().manual_seed(0))
    record = optimizer_step(engine, objective, _batches(), ctx, 1, torch.device("cpu"), torch.float32, max_bad=3)
    assert record.bad == 2 and record.images == 4 and torch.isfinite(torch.tensor(record.loss))
    # one optimizer step, from the third batch: DeepSpeed's counters and schedule moved once
    assert engine.global_steps == 1 and engine.micro_steps == 1 and engine.lr_scheduler.last_epoch == 1
    after = _state(engine)
    assert all(torch.isfinite(value).all() for value in after.values())
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_consecutive_non_finite_batches_stop_without_an_update(process_group, one_thread) -> None:
    from maskray.engine.step import NonFiniteLoss, optimizer_step

    objective, engine = _nan_engine("objective.nan_at={0: 5}")
    before = _state(engine)
    ctx = StepContext(0, 10, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteLoss, match="train.max_bad_batches: 3 consecutive batches .* at step 1"):
        optimizer_step(engine, objective, _batches(), ctx, 1, torch.device("cpu"), torch.float32, max_bad=3)
    assert engine.global_steps == 0 and engine.micro_steps == 0 and engine.lr_scheduler.last_epoch == 0
    after = _state(engine)
    assert all(torch.equal(before[name], after[name]) for name in before)


# --- metrics held until a checkpoint, never twice ------------------------------------------------------------------
def test_held_metrics_are_written_at_flush_and_never_below_the_logged_steps(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = find_or_create_run(uri, "faults", "held", {}, {})
    client = MlflowClient(uri)
    first = HeldMetrics(RunLogger(uri, run_id))
    first.add({"knn_random_init": 10.0}, 0)
    for step in (2, 4):
        first.add({"loss": float(step)}, step)
    assert client.get_metric_history(run_id, "loss") == []  # held
    first.flush()
    first.add({"loss": 6.0}, 6)  # lost with its worker: never flushed

    # a restart from an older checkpoint (step 2) than the metrics written (step 4): steps 3-4 come again
    second = HeldMetrics(RunLogger(uri, run_id))
    second.add({"knn_random_init": 11.0}, 0)
    for step in (4, 6, 8):
        second.add({"loss": 100.0 + step, "lr": 0.1}, step)
    second.flush()
    loss = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert sorted(loss) == [(2, 2.0), (4, 4.0), (6, 106.0), (8, 108.0)]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [4, 6, 8]
    assert [m.value for m in client.get_metric_history(run_id, "knn_random_init")] == [10.0]


# --- resuming under another world size -----------------------------------------------------------------------------
def _fake_checkpoint(directory: Path, workers: int, step: int, stage: str = "auto") -> None:
    """What :func:`~maskray.engine.driver.check_resume_layout` reads: the config, encoder and DeepSpeed tag."""
    config = load_config(None, [f"scaling.workers={workers}", f"train.zero_stage={stage}"])
    (directory / DEEPSPEED_DIR).mkdir(parents=True)
    (directory / DEEPSPEED_DIR / "latest").write_text(f"step{step}")
    (directory / CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json")))
    save_file({"x": torch.zeros(1)}, str(directory / ENCODER_FILE))


def test_resume_under_another_world_size_is_refused(tmp_path) -> None:
    from maskray.engine.driver import check_resume_layout

    _fake_checkpoint(tmp_path / "runs" / "two" / "checkpoint_000001", workers=2, step=40)
    config = load_config(None, [f"tracking.storage_path={tmp_path / 'runs'}", "scaling.workers=1"])
    with pytest.raises(ConfigError, match=r"^scaling.workers: run 'two' was checkpointed with 2 workers \(step 40\) "
                                          r"and cannot resume with 1; re-submit it with --workers 2"):
        check_resume_layout(config, "two")
    check_resume_layout(config.model_copy(update={"scaling": load_config(None).scaling}), "two")  # 2: fine
    check_resume_layout(config, "new-run")  # nothing to resume


def test_resume_under_another_zero_stage_is_refused(tmp_path) -> None:
    """A one-worker run checkpointed at stage 2 (the default before ``auto``) does not resume at ``auto``'s 0."""
    from maskray.engine.driver import check_resume_layout

    _fake_checkpoint(tmp_path / "runs" / "one" / "checkpoint_000001", workers=1, step=8, stage="2")
    config = load_config(None, [f"tracking.storage_path={tmp_path / 'runs'}", "scaling.workers=1"])
    with pytest.raises(ConfigError, match=r"^train.zero_stage: run 'one' was checkpointed with ZeRO stage 2 "
                                          r"\(step 8\) and cannot resume with stage 0; re-submit it with "
                                          r"--set train.zero_stage=2$"):
        check_resume_layout(config, "one")
    check_resume_layout(load_config(None, [f"tracking.storage_path={tmp_path / 'runs'}", "scaling.workers=1",
                                           "train.zero_stage=2"]), "one")


def test_the_launcher_refuses_it_with_exit_code_2_before_ray_starts(
    no_shared_ray, demo_shards, tmp_path, capsys
) -> None:
    import ray

    _fake_checkpoint(tmp_path / "runs" / "two" / "checkpoint_000001", workers=2, step=40)
    assert not ray.is_initialized()
    code = launch("pretrain.py", "--config", str(REPO / "configs/demo/mae.yaml"), "--run-name", "two",
                  "--workers", "1", "--set", f"data.shards={demo_shards / 'train'}", "--set", "eval.train_shards=null",
                  "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                  "--set", f"tracking.storage_path={tmp_path / 'runs'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: scaling.workers: run 'two' was checkpointed")
    assert not ray.is_initialized()
