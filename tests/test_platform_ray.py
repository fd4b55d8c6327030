"""The objective platform on Ray Train V2 + DeepSpeed (2 CPU workers, gloo): at every ZeRO stage, a composite
(MAE and an EMA-teacher part, 2 micro-batches per step) interrupted after 2 steps and resumed trains alike (the
same loss curve at every stage, in the same MLflow run, with the learning-rate schedule's values after the
resume), resumes exactly (teacher, extra state, and the masks an uninterrupted run draws on each rank) and logs
every part's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import experiment_runs, metric_history
from maskray_testing.twoview_ema import teacher_checksum

from maskray.checkpoint import OBJECTIVE_STATE_FILE, checkpoint_step
from maskray.engine.driver import run_pretraining
from maskray.schedules import warmup_cosine

pytestmark = pytest.mark.slow

SMALL = ("eval.train_shards=null", "eval.test_shards=null", "train.steps=4", "train.log_every=1",
         "train.checkpoint_every=2", "optim.warmup_steps=2", "data.batch_size=8", "data.num_workers=0")


def _history(config, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted(metric_history(config, run_id, key))


def _trace(directory: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (directory / f"rank{rank}.jsonl").read_text().splitlines()]


def _composite(demo_config, tmp_path, stage: int, trace: Path):
    trace.mkdir(parents=True)
    parts = f"[{{name: mae}}, {{name: twoview_ema, weight: 0.5, trace_dir: '{trace}'}}]"
    return demo_config(tmp_path, *SMALL, f"objective={{name: composite, parts: {parts}}}", "optim.grad_accum=2",
                       f"train.zero_stage={stage}")


@pytest.fixture(scope="module")
def reference(ray_session, demo_config, tmp_path_factory) -> tuple[list[tuple[int, float]], Path]:
    """The composite run uninterrupted for 4 steps (ZeRO-2): the losses and the masks that every interrupted and
    resumed run must give again."""
    tmp_path = tmp_path_factory.mktemp("reference")
    config = _composite(demo_config, tmp_path, 2, tmp_path / "trace")
    result = run_pretraining(config, run_name="reference")
    return _history(config, result.run_id, "loss"), tmp_path / "trace"


def test_every_zero_stage_resumes_the_composite_alike(ray_session, demo_config, tmp_path, reference) -> None:
    reference_loss, reference_trace = reference
    reference_records = {rank: _trace(reference_trace, rank) for rank in (0, 1)}
    curves = {}
    for stage in (0, 1, 2, 3):
        root = tmp_path / f"zero{stage}"
        trace = root / "trace"
        config = _composite(demo_config, root, stage, trace)
        first = run_pretraining(config, run_name="composite", max_steps=2)
        assert not first.resumed
        checkpoint = next(p for p in (root / "runs" / "composite").glob("checkpoint_*") if checkpoint_step(p) == 2)
        saved = torch.load(checkpoint / OBJECTIVE_STATE_FILE, weights_only=True)
        assert saved["extra"]["twoview_ema.seen"].item() == 2 * 2 * 8  # steps x micro-batches x batch, per rank
        second = run_pretraining(config, run_name="composite")
        assert second.resumed and second.run_id == first.run_id
        runs = experiment_runs(config)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"

        # every step once in the same MLflow run; before the interruption, the uninterrupted run's losses
        curves[stage] = _history(config, first.run_id, "loss")
        assert [step for step, _ in curves[stage]] == [1, 2, 3, 4], (stage, curves[stage])
        assert [loss for _, loss in curves[stage][:2]] == pytest.approx([loss for _, loss in reference_loss[:2]],
                                                                        rel=1e-4), (stage, curves[stage])
        # the scheduler state came back with the checkpoint: the steps after the resume log the schedule's values
        lr = dict(_history(config, first.run_id, "lr"))
        for step in (3, 4):
            assert lr[step] == pytest.approx(warmup_cosine(step, config.learning_rate(), 4, 2), abs=1e-9), (stage, lr)

        checksum = teacher_checksum(saved["teachers"]["parts.twoview_ema.teacher"])
        for rank in (0, 1):
            records = _trace(trace, rank)
            assert [(r["step"], r["micro"]) for r in records] == [(s, m) for s in range(4) for m in range(2)]
            resumed = [r for r in records if r["step"] >= 2]
            # the resumed process starts from exactly the saved teacher and counter, and draws the masks that the
            # uninterrupted run drew at the same steps
            assert {r["teacher"] for r in resumed} == {checksum}, stage
            assert resumed[0]["seen"] == 2 * 2 * 8 + 8
            assert [r["ids_keep"] for r in records] == [r["ids_keep"] for r in reference_records[rank]], stage
        assert all(a["ids_keep"] != b["ids_keep"] for a, b in zip(_trace(trace, 0), _trace(trace, 1), strict=True))

        for key in ("loss", "mae/loss", "twoview_ema/loss", "twoview_ema/target_std", "mae/mask_ratio",
                    "momentum/parts.twoview_ema.teacher"):
            assert [step for step, _ in _history(config, first.run_id, key)] == [1, 2, 3, 4], (stage, key)
        momentum = dict(_history(config, first.run_id, "momentum/parts.twoview_ema.teacher"))
        assert momentum[4] == pytest.approx(1.0) and momentum[1] == pytest.approx(0.9)
    # resumed, every stage continues alike (the resumed data stream restarts from the resume step: issue 20)
    for stage in (1, 2, 3):
        for (_, want), (_, have) in zip(curves[0], curves[stage], strict=True):
            assert have == pytest.approx(want, rel=1e-4), (stage, curves)
