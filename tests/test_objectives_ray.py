"""Every demo config end to end for a few steps through Ray Train + DeepSpeed, in one Ray session.

Each objective's demo config (``configs/demo/<name>.yaml``) runs ``STEPS`` optimizer steps with 2 workers at a
small batch, checkpoints once and reports its final k-NN; the run must finish with finite losses logged for
every step window and its final encoder as an artifact. Learning at full budget is ``benchmarks/objectives.py``'s
job (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from maskray.config import load_config
from maskray.engine.driver import run_pretraining
from maskray.weights import ARTIFACT_DIR, RUN_ARTIFACT

REPO = Path(__file__).resolve().parents[1]
STEPS = 3

pytestmark = pytest.mark.slow

# config file -> extra overrides it needs at test size (besides the shards, tracking and step budget); "{tokenizer}"
# is the directory of a tiny VQ-KD tokenizer for the demo's 32x32 images (the ``demo_tokenizer`` fixture)
DEMO_CONFIGS: dict[str, tuple[str, ...]] = {
    "mae.yaml": (),
    "vqkd.yaml": ("objective.teacher.source=random", "objective.teacher.arch=vit_tiny_patch16_224",
                  "objective.teacher.model_kwargs={patch_size: 4, depth: 1}", "objective.num_codes=32"),
    "beitv2.yaml": ("objective.tokenizer.path={tokenizer}",),
}
# config file -> an artifact its run must keep
ARTIFACTS = {"vqkd.yaml": "tokenizer/tokenizer.json"}


def test_every_demo_config_runs_here() -> None:
    """A new demo config gets its few-step run here (configs that need an earlier run's output are listed in
    DEMO_CONFIGS with the overrides that provide it)."""
    assert sorted(p.name for p in (REPO / "configs" / "demo").glob("*.yaml")) == sorted(
        set(DEMO_CONFIGS) | {"mae_gray.yaml"})


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory) -> Path:
    from helpers import tiny_tokenizer

    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tok", img_size=32, num_codes=16)


@pytest.mark.parametrize("name", sorted(DEMO_CONFIGS))
def test_demo_config_runs_a_few_steps(name, ray_session, demo_shards, tmp_path, request) -> None:
    overrides = [item.format(tokenizer=request.getfixturevalue("demo_tokenizer")) if "{tokenizer}" in item else item
                 for item in DEMO_CONFIGS[name]]
    config = load_config(REPO / "configs" / "demo" / name, [
        f"data.shards={demo_shards / 'train'}",
        f"eval.train_shards={demo_shards / 'train'}",
        f"eval.test_shards={demo_shards / 'test'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.storage_path={tmp_path / 'runs'}",
        f"train.steps={STEPS}", "train.log_every=1", f"train.checkpoint_every={STEPS}", "optim.warmup_steps=1",
        "data.batch_size=8", "eval.random_init=false", "scaling.workers=2",
        *overrides,
    ])
    result = run_pretraining(config, run_name=f"few-steps-{Path(name).stem}")
    history = MlflowClient(config.tracking.resolved_uri()).get_metric_history(result.run_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m.value) for m in history)
    assert "knn_top1" in result.metrics
    client = MlflowClient(config.tracking.resolved_uri())  # the final encoder, kept when checkpoints rotate
    assert RUN_ARTIFACT in [a.path for a in client.list_artifacts(result.run_id, ARTIFACT_DIR)]
    if name in ARTIFACTS:
        folder = ARTIFACTS[name].rpartition("/")[0]
        listed = MlflowClient(config.tracking.resolved_uri()).list_artifacts(result.run_id, folder)
        assert ARTIFACTS[name] in [item.path for item in listed]
