"""Every demo config end to end for a few steps through Ray Train + DeepSpeed, in one Ray session.

Each objective's demo config (``configs/demo/<name>.yaml``) runs ``STEPS`` optimizer steps at a small batch,
checkpoints once and reports its final k-NN; the run must finish with finite losses logged for every step window,
the loop's metrics, its figures and its final encoder as artifacts (MAE's run also evaluates during training).
MAE, VQ-KD and the composites run on 2 workers, the others on 1 (TWO_WORKERS says why); the runs go two at a
time. Learning at full budget is ``benchmarks/objectives.py``'s job (BENCHMARKS.md).
The one-channel demo (``mae_gray.yaml``) also evaluates its random init and exports to timm.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from helpers import SIDE_BY_SIDE, check_export, metric_steps, two_at_a_time
from mlflow.tracking import MlflowClient

from maskray.engine.driver import run_pretraining
from maskray.weights import ARTIFACT_DIR, RUN_ARTIFACT

REPO = Path(__file__).resolve().parents[1]
STEPS = 3

pytestmark = pytest.mark.slow

# config file -> extra overrides it needs at test size (besides the shards, tracking and step budget);
# "{demo_clips}" stands for the demo_clip_shards fixture's directory
CLIPS = ("data.shards={demo_clips}/clips", "eval.train_shards={demo_clips}/train", "eval.test_shards={demo_clips}/test")
DEMO_CONFIGS: dict[str, tuple[str, ...]] = {
    "mae.yaml": ("eval.every=2", "data.num_workers=2"),  # a k-NN during training too; loader processes
    "dtm.yaml": (),  # its teacher: DEPENDS
    "vqkd.yaml": ("objective.num_codes=32",),  # its teacher: DEPENDS
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
# 2 workers: the default path (MAE: loader processes), VQ-KD (its codebook's all_reduce has no two-rank test of its
# own) and the composites; the rest train alike on 1. MoCo v3's and MSN's all_gather and MAE-LUT's global batch
# norm are checked on two ranks against one process on the whole batch in test_moco_v3.py, test_msn.py and
# test_mae_lut.py, and 2 workers at every ZeRO stage in test_platform_ray.py.
TWO_WORKERS = {"mae.yaml", "vqkd.yaml", "mae_moco.yaml", "cl_mim_hybrid.yaml"}
# config file -> (the demo config whose few-step run it needs, the override naming that run by "{run_id}"). A
# teacher's run has its checkpoints deleted first: teachers come from the run's kept artifacts. Both runs share
# an MLflow store (the teacher is found by run id).
DEPENDS = {
    "dtm.yaml": ("mae.yaml", "objective.teacher={{source: maskray, run_id: {run_id}}}"),
    "vqkd.yaml": ("mae.yaml", "objective.teacher={{source: maskray, run_id: {run_id}}}"),
    "beitv2.yaml": ("vqkd.yaml", "objective.tokenizer={{run_id: {run_id}}}"),
}
# config file -> an artifact its run must keep (besides the final encoder)
ARTIFACTS = {"vqkd.yaml": "tokenizer/tokenizer.json"}


def test_every_demo_config_runs_here() -> None:
    """A new demo config gets its few-step run here (configs that need an earlier run's output are listed in
    DEPENDS)."""
    assert sorted(p.name for p in (REPO / "configs" / "demo").glob("*.yaml")) == sorted(DEMO_CONFIGS)


@pytest.fixture(scope="module")
def demo_runs(ray_session, demo_config, demo_clip_shards, tmp_path_factory):
    """config file -> the future of its few-step run's (result, config), all run once per module, two at a time
    (the runs that others need first); each run (with the runs that need it) has its own MLflow store."""
    root = tmp_path_factory.mktemp("demo-runs")

    def job(name: str):
        def train(futures):
            extra: tuple[str, ...] = ()
            store = root / Path(name).stem
            if name in DEPENDS:
                source, override = DEPENDS[name]
                earlier, earlier_config = futures[source].result()
                runs = Path(earlier_config.tracking.storage_path)
                shutil.rmtree(runs / earlier.run_name, ignore_errors=True)
                extra, store = (override.format(run_id=earlier.run_id),), runs.parent
            own = tuple(o.replace("{demo_clips}", str(demo_clip_shards)) for o in DEMO_CONFIGS[name])
            config = demo_config(
                store, f"train.steps={STEPS}", "train.log_every=1", f"train.checkpoint_every={STEPS}",
                "optim.warmup_steps=1", "data.batch_size=8", "data.num_workers=0", "eval.random_init=false",
                f"scaling.workers={2 if name in TWO_WORKERS else 1}", *SIDE_BY_SIDE, *own, *extra, config=name,
            )
            return run_pretraining(config, run_name=f"few-steps-{Path(name).stem}"), config
        return train

    def needs(name: str) -> int:  # how many runs before it this one waits for
        return 1 + needs(DEPENDS[name][0]) if name in DEPENDS else 0

    return two_at_a_time({name: job(name) for name in sorted(DEMO_CONFIGS, key=needs)})


@pytest.mark.parametrize("name", sorted(DEMO_CONFIGS))
def test_demo_config_runs_a_few_steps(name, demo_runs) -> None:
    result, config = demo_runs[name].result()
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
        earlier = demo_runs[DEPENDS[name][0]].result()[0]
        assert earlier.run_id in {params.get("objective.teacher.run_id"), params.get("objective.tokenizer.run_id")}
    if name == "dtm.yaml":
        assert len(params["objective.teacher.sha256"]) == 64
    if name == "mae.yaml":  # every eval.every steps during training, and at the end; the objective's figures
        assert metric_steps(config, result.run_id, "knn_top1") == [2, STEPS]
        assert "reconstructions.png" in artifacts


def test_one_channel_demo_evaluates_and_exports(demo_runs, tmp_path) -> None:
    result, config = demo_runs["mae_gray.yaml"].result()
    assert config.model.in_chans == 1
    assert {"knn_top1", "knn_top1_random_init"} <= set(result.metrics)
    assert result.metrics["skipped_samples"] == 0
    check_export(result, config, tmp_path / "grey.safetensors", 1)
