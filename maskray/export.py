"""Export a pretrained encoder: a safetensors file that timm loads as pretrained weights, or an ONNX graph.

The file is the state dict of the encoder's timm ``VisionTransformer`` (fp32; the fixed sin-cos ``pos_embed``
is part of it, so nothing has to be recomputed), with the arch and the ``timm.create_model`` overrides in its
metadata. With timm 1.0.31, offline, both of these load it strictly (no missing or unexpected keys):

    timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path), **timm_kwargs)
    timm.create_model(arch, num_classes=0, checkpoint_path=path, **timm_kwargs)

(a ``file`` in the pretrained cfg takes priority over the hub and URL sources, so nothing is downloaded).
The metadata format is :mod:`maskray.weights` (``launch/embed.py --weights`` rebuilds the encoder from it).
When the checkpoint belongs to an MLflow run, the file and ``timm.json`` (arch, kwargs, the call) are logged to
the run as artifacts ``encoder/encoder.safetensors`` and ``encoder/timm.json``.

ONNX (:func:`export_onnx`, optional extra ``onnx``): the encoder's unmasked forward, images (B, C, H, W) ->
tokens (B, 1+L, D) after the final norm, batch axis dynamic, exported with torch's ``torch.export``-based
exporter (the default since torch 2.9; the TorchScript one is deprecated and bakes the shape checks in as
constants), weights inside the one ``.onnx`` file. It is checked by running onnxruntime on a random batch of
another size than the traced one and comparing with torch; logged as ``encoder/encoder.onnx``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from maskray.checkpoint import load_encoder
from maskray.errors import ConfigError
from maskray.eval.runner import EvalTarget, resolve_target
from maskray.models import MaskedViT
from maskray.weights import ARTIFACT_DIR, weights_metadata


@dataclass(frozen=True)
class ExportResult:
    path: Path
    checkpoint: str
    arch: str
    timm_kwargs: dict[str, Any]
    run_id: str | None

    def create_model_call(self, path: str | None = None) -> str:
        """The ``timm.create_model`` call that loads the export (``path`` defaults to where it was written)."""
        kwargs = "".join(f", {key}={value!r}" for key, value in self.timm_kwargs.items())
        file = str(self.path) if path is None else path
        return (f"timm.create_model({self.arch!r}, pretrained=True, num_classes=0, "
                f"pretrained_cfg_overlay=dict(file={file!r}){kwargs})")


def export_encoder(
    out_path: str | Path,
    run_id: str | None = None,
    checkpoint: str | Path | None = None,
    tracking_uri: str | None = None,
) -> ExportResult:
    """Write the encoder of ``checkpoint`` (or of the latest checkpoint of ``run_id``) to ``out_path``."""
    target = resolve_target(tracking_uri, run_id, checkpoint, create_run=False)
    encoder, config = load_encoder(target.checkpoint)
    out = Path(out_path).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = {key: value.contiguous() for key, value in encoder.timm_state_dict().items()}
    metadata = weights_metadata(encoder, target.checkpoint, target.step, config.data.mean, config.data.std)
    save_file(weights, str(out), metadata=metadata)
    result = ExportResult(out, target.checkpoint, encoder.arch, dict(encoder.timm_kwargs), target.run_id)
    description = {"arch": result.arch, "timm_kwargs": result.timm_kwargs,
                   "create_model": result.create_model_call("encoder.safetensors")}
    _log_to_run(target, {"encoder.safetensors": out, "timm.json": json.dumps(description, indent=2)})
    return result


@dataclass(frozen=True)
class OnnxExportResult:
    """An ONNX export and its check: onnxruntime vs torch on a random ``check_shape`` batch."""

    path: Path
    checkpoint: str
    run_id: str | None
    check_shape: tuple[int, ...]
    max_abs_diff: float


class EncoderTokens(torch.nn.Module):
    """The graph exported to ONNX: images (B, C, H, W) -> tokens (B, 1+L, D) after the final norm."""

    def __init__(self, encoder: MaskedViT):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).tokens


def onnx_max_abs_diff(path: str | Path, encoder: MaskedViT, images: torch.Tensor) -> float:
    """Max abs difference between onnxruntime (CPU) running ``path`` and ``encoder`` (torch, eval) on images."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_tokens,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch_tokens = encoder.eval()(images).tokens
    return float((torch.from_numpy(onnx_tokens) - torch_tokens).abs().max())


def export_onnx(
    out_path: str | Path,
    run_id: str | None = None,
    checkpoint: str | Path | None = None,
    tracking_uri: str | None = None,
    check_batch: int = 3,
) -> OnnxExportResult:
    """Write the encoder of ``checkpoint`` (or of the latest checkpoint of ``run_id``) as ONNX to ``out_path``
    (traced at batch 2, batch axis dynamic) and check it on a random batch of ``check_batch`` images."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs onnx and onnxscript; the check onnxruntime)
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--format onnx needs the optional extra onnx (pip install -e '.[onnx]'): {exc}") from None
    target = resolve_target(tracking_uri, run_id, checkpoint, create_run=False)
    encoder, _ = load_encoder(target.checkpoint)
    encoder.eval()
    out = Path(out_path).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    size = encoder.grid_size[0] * encoder.patch_size, encoder.grid_size[1] * encoder.patch_size
    example = torch.randn(2, encoder.in_chans, *size, generator=generator)
    torch.onnx.export(EncoderTokens(encoder).eval(), (example,), str(out), input_names=["images"],
                      output_names=["tokens"], dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                      dynamo=True, external_data=False, verbose=False)
    images = torch.randn(check_batch, encoder.in_chans, *size, generator=generator)
    result = OnnxExportResult(out, target.checkpoint, target.run_id, tuple(images.shape),
                              onnx_max_abs_diff(out, encoder, images))
    _log_to_run(target, {"encoder.onnx": out})
    return result


def _log_to_run(target: EvalTarget, files: dict[str, Path | str]) -> None:
    """Log ``files`` (name -> a file to copy, or text) as artifacts ``encoder/<name>`` of the target's run."""
    if target.run_id is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, Path(tmp, name))
            else:
                Path(tmp, name).write_text(content)
        MlflowClient(target.tracking_uri).log_artifacts(target.run_id, tmp, ARTIFACT_DIR)
