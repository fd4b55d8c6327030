"""ONNX export (optional extra ``onnx``): onnxruntime matches torch, the batch axis is dynamic, the file is logged."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import onnx
import onnxruntime
import torch
from helpers import launch
from mlflow.tracking import MlflowClient

from maskray.checkpoint import load_encoder
from maskray.export import onnx_max_abs_diff

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "pre_platform"
# Measured on the demo model (depth 4) and the pre-platform one (depth 1): 2.3e-6 and 1e-6 at most.
TOLERANCE = 1e-4


def test_onnx_export_matches_torch_for_any_batch_and_is_logged(tmp_path, capsys) -> None:
    shutil.copytree(FIXTURE, tmp_path / "pre_platform")
    store = f"sqlite:///{tmp_path / 'pre_platform' / 'mlflow.db'}"
    checkpoint = tmp_path / "pre_platform" / "runs" / "pre-platform" / "checkpoint_step2"
    out = tmp_path / "out" / "encoder.onnx"
    assert launch("export.py", "--checkpoint", str(checkpoint), "--tracking-uri", store, "--format", "onnx",
                   "--out", str(out)) == 0
    printed = capsys.readouterr().out
    reported = float(re.search(r"max abs difference (\S+)", printed).group(1))
    assert 0 < reported < TOLERANCE  # compared for real: float32 kernels differ, never bit for bit

    graph = onnx.load(str(out)).graph
    (images,), (tokens,) = graph.input, graph.output
    assert [dim.dim_param or dim.dim_value for dim in images.type.tensor_type.shape.dim][1:] == [3, 16, 16]
    assert images.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert [dim.dim_value for dim in tokens.type.tensor_type.shape.dim][1:] == [1 + 16, 192]
    encoder, _ = load_encoder(checkpoint)
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 5):  # neither is the traced batch (2)
        diff = onnx_max_abs_diff(out, encoder, torch.randn(batch, 3, 16, 16, generator=generator))
        assert diff < TOLERANCE, (batch, diff)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": torch.zeros(4, 3, 16, 16).numpy()})[0].shape == (4, 17, 192)

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("maskray-demo").experiment_id])
    assert "encoder/encoder.onnx" in {item.path for item in client.list_artifacts(run.info.run_id, "encoder")}
    assert f"logged as artifact encoder/encoder.onnx of run {run.info.run_id}" in printed
