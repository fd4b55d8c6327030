"""Every demo config end to end for a few steps through Ray Train + DeepSpeed, in one Ray session.

Each objective's demo config (``configs/demo/<name>.yaml``) runs ``STEPS`` optimizer steps with 2 workers at a
small batch, checkpoints once and reports its final k-NN; the run must finish with finite losses logged for
every step window, the loop's metrics, its figures and its final encoder as artifacts (MAE's run also evaluates
during training). Learning at full budget is ``benchmarks/objectives.py``'s job (BENCHMARKS.md). The one-channel
demo (``mae_gray.yaml``) also evaluates its random init and exports to timm.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from helpers import check_export, metric_steps
from mlflow.tracking import MlflowClient

from maskray.engine.driver import run_pretraining
from maskray.weights import ARTIFACT_DIR, RUN_ARTIFACT

REPO = Path(__file__).resolve().parents[1]
STEPS = 3

pytestmark = pytest.mark.slow

# config file -> extra overrides it needs at test size (besides the shards, tracking and step budget);
# "{demo_clips}" stands for the demo_clip_shards fixture's directory (built only for configs that name it)
CLIPS = ("data.shards={demo_clips}/clips", "eval.train_shards={demo_clips}/train", "eval.test_shards={demo_clips}/test")
DEMO_CONFIGS: dict[str, tuple[str, ...]] = {
    "mae.yaml": ("eval.every=2", "data.num_workers=2"),  # a k-NN during training too; loader processes
    "dtm.yaml": (),  # its teacher: DEPENDS
    "vqkd.yaml": ("objective.teacher.source=random", "objective.teacher.arch=vit_tiny_patch16_224",
                  "objective.teacher.model_kwargs={patch_size: 4, depth: 1}", "objective.num_codes=32"),
    "beitv2.yaml": (),  # its tokenizer: DEPENDS
    "mae_lut.yaml": (),
    "tobo.yaml": (*CLIPS, "objective.decoder_depth=1"),
    "mae_moco.yaml": (),
    "moco_v3.yaml": (),
    "simmim.yaml": (),
    "cl_mim_hybrid.yaml": (),
    "msn.yaml": ("objective.focal_views=2",),  # the demo trains without focal crops; run them end to end
    "mae_gray.yaml": ("eval.random_init=true",),  # one channel: k-NN of the trained and the random encoder
}
# config file -> (the demo config whose few-step run it needs, the override naming that run by "{run_id}"). A
# teacher's run has its checkpoints deleted first: teachers come from the run's kept artifacts.
DEPENDS = {
    "dtm.yaml": ("mae.yaml", "objective.teacher={{source: maskray, run_id: {run_id}}}"),
    "beitv2.yaml": ("vqkd.yaml", "objective.tokenizer={{run_id: {run_id}}}"),
}
# config file -> an artifact its run must keep (besides the final encoder)
ARTIFACTS = {"vqkd.yaml": "tokenizer/tokenizer.json"}


def test_every_demo_config_runs_here() -> None:
    """A new demo config gets its few-step run here (configs that need an earlier run's output are listed in
    DEPENDS)."""
    assert sorted(p.name for p in (REPO / "configs" / "demo").glob("*.yaml")) == sorted(DEMO_CONFIGS)


@pytest.fixture(scope="module")
def demo_run(ray_session, demo_config, tmp_path_factory, request):
    """``demo_run(name)`` -> (result, config) of the few-step run of ``configs/demo/<name>``, once per module; all
    runs share one MLflow store."""
    root = tmp_path_factory.mktemp("demo-runs")
    done: dict[str, tuple] = {}

    def run(name: str):
        if name in done:
            return done[name]
        extra: tuple[str, ...] = ()
        if name in DEPENDS:
            source, override = DEPENDS[name]
            earlier, earlier_config = run(source)
            shutil.rmtree(Path(earlier_config.tracking.storage_path) / earlier.run_name, ignore_errors=True)
            extra = (override.format(run_id=earlier.run_id),)
        own = DEMO_CONFIGS[name]
        if any("{demo_clips}" in override for override in own):
            own = tuple(o.format(demo_clips=request.getfixturevalue("demo_clip_shards")) for o in own)
        config = demo_config(
            root, f"train.steps={STEPS}", "train.log_every=1", f"train.checkpoint_every={STEPS}",
            "optim.warmup_steps=1", "data.batch_size=8", "data.num_workers=0", "eval.random_init=false",
            "scaling.workers=2", *own, *extra,
            config=name,
        )
        done[name] = run_pretraining(config, run_name=f"few-steps-{Path(name).stem}"), config
        return done[name]

    return run


@pytest.mark.parametrize("name", sorted(DEMO_CONFIGS))
def test_demo_config_runs_a_few_steps(name, demo_run) -> None:
    result, config = demo_run(name)
    client = MlflowClient(config.tracking.resolved_uri())
    history = client.get_metric_history(result.run_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m.value) for m in history)
    assert {"loss", "knn_top1", "images_per_s", "data_wait_frac", "skipped_samples", "lr"} <= set(result.metrics)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "loss_curve.png" in artifacts
    # the final encoder, kept when the checkpoints rotate (a later run's frozen teacher)
    assert RUN_ARTIFACT in [a.path for a in client.list_artifacts(result.run_id, ARTIFACT_DIR)]
    if name in ARTIFACTS:
        folder = ARTIFACTS[name].rpartition("/")[0]
        assert ARTIFACTS[name] in [item.path for item in client.list_artifacts(result.run_id, folder)]
    if name in DEPENDS:
        params = client.get_run(result.run_id).data.params
        earlier = demo_run(DEPENDS[name][0])[0]
        assert earlier.run_id in {params.get("objective.teacher.run_id"), params.get("objective.tokenizer.run_id")}
    if name == "dtm.yaml":
        assert len(params["objective.teacher.sha256"]) == 64
    if name == "mae.yaml":  # every eval.every steps during training, and at the end; the objective's figures
        assert metric_steps(config, result.run_id, "knn_top1") == [2, STEPS]
        assert "reconstructions.png" in artifacts


def test_one_channel_demo_evaluates_and_exports(demo_run, tmp_path) -> None:
    result, config = demo_run("mae_gray.yaml")
    assert config.model.in_chans == 1
    assert {"knn_top1", "knn_top1_random_init"} <= set(result.metrics)
    assert result.metrics["skipped_samples"] == 0
    check_export(result, config, tmp_path / "grey.safetensors", 1)
