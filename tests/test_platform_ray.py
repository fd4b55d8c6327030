"""The objective platform on Ray Train V2 + DeepSpeed (2 CPU workers, gloo): every ZeRO stage trains and resumes
the demo with the same loss curve, in the same MLflow run, with the learning-rate schedule's values after the
resume; a composite with an EMA-teacher part resumes exactly (teacher, extra state,
per-rank masks) under ZeRO-2 and ZeRO-3 and logs every part's metrics."""

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


def _config(demo_config, root: Path, *extra: str):
    return demo_config(root, *SMALL, *extra)


def _history(config, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted(metric_history(config, run_id, key))


def test_every_zero_stage_trains_and_resumes_the_demo_alike(ray_session, demo_config, tmp_path) -> None:
    curves = {}
    for stage in (0, 1, 2, 3):
        config = _config(demo_config, tmp_path / f"zero{stage}", f"train.zero_stage={stage}")
        first = run_pretraining(config, run_name=f"zero{stage}", max_steps=2)
        assert not first.resumed
        assert list((tmp_path / f"zero{stage}" / "runs" / f"zero{stage}").glob("checkpoint_*")), "no checkpoint"
        second = run_pretraining(config, run_name=f"zero{stage}")
        assert second.resumed and second.run_id == first.run_id
        curves[stage] = _history(config, first.run_id, "loss")
        assert [step for step, _ in curves[stage]] == [1, 2, 3, 4], (stage, curves[stage])
        # the scheduler state came back with the checkpoint: the steps after the resume log the schedule's values
        lr = dict(_history(config, first.run_id, "lr"))
        for step in (3, 4):
            assert lr[step] == pytest.approx(warmup_cosine(step, config.learning_rate(), 4, 2), abs=1e-9), (stage, lr)
        runs = experiment_runs(config)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for stage in (1, 2, 3):
        for (_, want), (_, have) in zip(curves[0], curves[stage], strict=True):
            assert have == pytest.approx(want, rel=1e-4), (stage, curves)


def _trace(directory: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (directory / f"rank{rank}.jsonl").read_text().splitlines()]


def _composite(demo_config, tmp_path, stage: int, trace: Path):
    trace.mkdir(parents=True)
    parts = f"[{{name: mae}}, {{name: twoview_ema, weight: 0.5, trace_dir: '{trace}'}}]"
    return _config(demo_config, tmp_path, f"objective={{name: composite, parts: {parts}}}",
                   "optim.grad_accum=2", f"train.zero_stage={stage}")


@pytest.fixture(scope="module")
def reference_trace(ray_session, demo_config, tmp_path_factory) -> Path:
    """The composite run uninterrupted for 4 steps (ZeRO-2): the masks a resumed run must draw again."""
    tmp_path = tmp_path_factory.mktemp("reference")
    run_pretraining(_composite(demo_config, tmp_path, 2, tmp_path / "trace"), run_name="reference")
    return tmp_path / "trace"


@pytest.mark.parametrize("stage", [2, 3])
def test_composite_with_ema_teacher_resumes_exactly(ray_session, demo_config, tmp_path, reference_trace, stage) -> None:
    trace = tmp_path / "trace"
    config = _composite(demo_config, tmp_path, stage, trace)
    first = run_pretraining(config, run_name="composite", max_steps=2)
    checkpoint = next(p for p in (tmp_path / "runs" / "composite").glob("checkpoint_*") if checkpoint_step(p) == 2)
    saved = torch.load(checkpoint / OBJECTIVE_STATE_FILE, weights_only=True)
    assert saved["extra"]["twoview_ema.seen"].item() == 2 * 2 * 8  # steps x micro-batches x batch, per rank
    second = run_pretraining(config, run_name="composite")
    assert second.run_id == first.run_id

    reference = {rank: _trace(reference_trace, rank) for rank in (0, 1)}
    for rank in (0, 1):
        records = _trace(trace, rank)
        assert [(r["step"], r["micro"]) for r in records] == [(s, m) for s in range(4) for m in range(2)]
        resumed = [r for r in records if r["step"] >= 2]
        # the resumed process starts from exactly the saved teacher and counter, and draws the masks that the
        # uninterrupted run drew at the same steps
        assert {r["teacher"] for r in resumed} == {teacher_checksum(saved["teachers"]["parts.twoview_ema.teacher"])}
        assert resumed[0]["seen"] == 2 * 2 * 8 + 8
        assert [r["ids_keep"] for r in records] == [r["ids_keep"] for r in reference[rank]]
    assert all(a["ids_keep"] != b["ids_keep"] for a, b in zip(_trace(trace, 0), _trace(trace, 1), strict=True))

    for key in ("loss", "mae/loss", "twoview_ema/loss", "twoview_ema/target_std", "mae/mask_ratio",
                "momentum/parts.twoview_ema.teacher"):
        assert [step for step, _ in _history(config, first.run_id, key)] == [1, 2, 3, 4], key
    momentum = dict(_history(config, first.run_id, "momentum/parts.twoview_ema.teacher"))
    assert momentum[4] == pytest.approx(1.0) and momentum[1] == pytest.approx(0.9)
