"""Every demo config end to end for a few steps through Ray Train + DeepSpeed, in one Ray session.

Each objective's demo config (``configs/demo/<name>.yaml``) runs ``STEPS`` optimizer steps with 2 workers at a
small batch, checkpoints once and reports its final k-NN; the run must finish with finite losses logged for
every step window. Learning at full budget is ``benchmarks/objectives.py``'s job (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from maskray.config import load_config
from maskray.engine.driver import run_pretraining

REPO = Path(__file__).resolve().parents[1]
STEPS = 3

pytestmark = pytest.mark.slow

# config file -> extra overrides it needs at test size (besides the shards, tracking and step budget)
DEMO_CONFIGS: dict[str, tuple[str, ...]] = {
    "mae.yaml": (),
    "msn.yaml": (),
}


def test_every_demo_config_runs_here() -> None:
    """A new demo config gets its few-step run here (configs that need an earlier run's output are listed in
    DEMO_CONFIGS with the overrides that provide it)."""
    assert sorted(p.name for p in (REPO / "configs" / "demo").glob("*.yaml")) == sorted(
        set(DEMO_CONFIGS) | {"mae_gray.yaml"})


@pytest.mark.parametrize("name", sorted(DEMO_CONFIGS))
def test_demo_config_runs_a_few_steps(name, ray_session, demo_shards, tmp_path) -> None:
    config = load_config(REPO / "configs" / "demo" / name, [
        f"data.shards={demo_shards / 'train'}",
        f"eval.train_shards={demo_shards / 'train'}",
        f"eval.test_shards={demo_shards / 'test'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.storage_path={tmp_path / 'runs'}",
        f"train.steps={STEPS}", "train.log_every=1", f"train.checkpoint_every={STEPS}", "optim.warmup_steps=1",
        "data.batch_size=8", "eval.random_init=false", "scaling.workers=2",
        *DEMO_CONFIGS[name],
    ])
    result = run_pretraining(config, run_name=f"few-steps-{Path(name).stem}")
    history = MlflowClient(config.tracking.resolved_uri()).get_metric_history(result.run_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m.value) for m in history)
    assert "knn_top1" in result.metrics
