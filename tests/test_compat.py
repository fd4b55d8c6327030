"""A checkpoint and an MLflow run written before the objective platform (tests/fixtures/pre_platform, see the
README there) still evaluate, export and compare."""

from __future__ import annotations

import shutil
from pathlib import Path

import timm
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from maskray.checkpoint import load_encoder, read_checkpoint_config
from maskray.eval.runner import EvalSettings, evaluate, resolve_target
from maskray.export import export_encoder
from maskray.tracking.compare import compare_runs

FIXTURE = Path(__file__).parent / "fixtures" / "pre_platform"


def _copy(tmp_path: Path) -> tuple[str, Path]:
    shutil.copytree(FIXTURE, tmp_path / "pre_platform")
    root = tmp_path / "pre_platform"
    return f"sqlite:///{root / 'mlflow.db'}", root / "runs" / "pre-platform" / "checkpoint_step2"


def test_pre_platform_checkpoint_evaluates_into_its_old_run(ray_session, knn_shards, tmp_path) -> None:
    store, checkpoint = _copy(tmp_path)
    config = read_checkpoint_config(checkpoint)
    assert (config.objective.name, config.objective.params["mask_ratio"], config.model.depth) == ("mae", 0.75, 1)
    target = resolve_target(store, checkpoint=checkpoint)
    client = MlflowClient(store)
    assert target.step == 2 and client.get_run(target.run_id).data.tags["maskray.run_name"] == "pre-platform"
    metrics = evaluate(target, EvalSettings(kinds=("knn",), train_shards=str(knn_shards / "train"),
                                            test_shards=str(knn_shards / "test")))
    assert 10.0 < metrics["knn_top1"] <= 100.0
    assert [m.step for m in client.get_metric_history(target.run_id, "knn_top1")] == [2]
    rows = compare_runs(store, "maskray-demo")
    assert [(row.name, row.objective, row.steps) for row in rows] == [("pre-platform", "mae", 2)]


def test_pre_platform_checkpoint_exports_to_timm(tmp_path) -> None:
    _, checkpoint = _copy(tmp_path)
    result = export_encoder(tmp_path / "vit.safetensors", checkpoint=checkpoint,
                            tracking_uri=f"sqlite:///{tmp_path / 'absent.db'}")
    assert result.run_id is None
    model = timm.create_model(result.arch, num_classes=0, checkpoint_path=str(result.path), **result.timm_kwargs)
    assert set(load_file(str(result.path))) == set(model.state_dict())
    encoder, _ = load_encoder(checkpoint)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(images), encoder.eval()(images).tokens)
