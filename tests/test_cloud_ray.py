"""A run on cloud-style services, all on 127.0.0.1: shards and checkpoints in an S3 bucket (moto's server mode),
tracking on a real ``mlflow server`` process. Interrupted, resumed from the bucket, then evaluated and exported
from the bucket by run id."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import launch, upload
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from maskray import storage
from maskray.checkpoint import ENCODER_FILE
from maskray.config import load_config
from maskray.engine.driver import run_pretraining
from maskray.eval.runner import resolve_target

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_run_checkpoints_to_s3_resumes_from_it_and_tracks_on_a_server(
    s3_bucket, mlflow_server, ray_session, demo_shards, knn_shards, tmp_path, monkeypatch
) -> None:
    tracking_uri, artifacts = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # tracking.uri stays null
    shards = upload(demo_shards / "train", f"{s3_bucket}/shards/train")
    knn = upload(knn_shards / "train", f"{s3_bucket}/shards/knn")
    runs = f"{s3_bucket}/maskray"
    config = load_config(REPO / "configs/demo/mae.yaml", [
        f"data.shards={shards}", f"eval.train_shards={knn}", f"eval.test_shards={knn}", "eval.every=0",
        f"tracking.storage_path={runs}", "train.steps=6", "train.log_every=2", "train.checkpoint_every=2",
        "optim.warmup_steps=2", "data.batch_size=16",
    ])
    first = run_pretraining(config, run_name="on-s3", max_steps=4)
    assert not first.resumed and first.tracking_uri == tracking_uri
    checkpoints = [f"{runs}/on-s3/{name}" for name in storage.list_dir(f"{runs}/on-s3")]
    checkpoints = [path for path in checkpoints if storage.is_dir(path)]  # not checkpoint_manager_snapshot.json
    assert len(checkpoints) == 2 and all(storage.is_file(f"{path}/{ENCODER_FILE}") for path in checkpoints)
    assert not Path("s3:").exists()  # the old bug: a local folder named after the URI

    second = run_pretraining(config, run_name="on-s3")
    assert second.resumed and second.run_id == first.run_id
    client = MlflowClient(tracking_uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [2, 4, 6]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["tracking.storage_path"] == runs
    assert "knn_top1" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(first.run_id)}
    assert "loss_curve.png" in logged
    assert list(artifacts.rglob("loss_curve.png")), "artifacts were not stored by the server"

    target = resolve_target(tracking_uri, first.run_id)
    assert target.checkpoint.startswith(f"{runs}/on-s3/checkpoint_") and target.step == 6
    out = tmp_path / "encoder.safetensors"
    assert launch("export.py", "--run-id", first.run_id, "--out", str(out)) == 0
    with safe_open(str(out), "pt") as exported:
        assert exported.metadata()["checkpoint"] == target.checkpoint and exported.metadata()["step"] == "6"
    assert launch("evaluate.py", "--run-id", first.run_id, "--only", "knn") == 0
    assert client.get_run(first.run_id).data.tags["maskray.eval_checkpoint"] == target.checkpoint
