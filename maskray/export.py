"""Export a pretrained encoder as a safetensors file that timm loads as pretrained weights.

The file is the state dict of the encoder's timm ``VisionTransformer`` (fp32; the fixed sin-cos ``pos_embed``
is part of it, so nothing has to be recomputed), with the arch and the ``timm.create_model`` overrides in its
metadata. With timm 1.0.31, offline, both of these load it strictly (no missing or unexpected keys):

    timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path), **timm_kwargs)
    timm.create_model(arch, num_classes=0, checkpoint_path=path, **timm_kwargs)

(a ``file`` in the pretrained cfg takes priority over the hub and URL sources, so nothing is downloaded).
When the checkpoint belongs to an MLflow run, the file and ``timm.json`` (arch, kwargs, the call) are logged to
the run as artifacts ``encoder/encoder.safetensors`` and ``encoder/timm.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from maskray.checkpoint import load_encoder
from maskray.eval.runner import resolve_target


@dataclass(frozen=True)
class ExportResult:
    path: Path
    checkpoint: Path
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
    encoder, _ = load_encoder(target.checkpoint)
    out = Path(out_path).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "arch": encoder.arch,
        "timm_kwargs": json.dumps(encoder.timm_kwargs),
        "checkpoint": str(target.checkpoint),
        "step": str(target.step),
    }
    weights = {key: value.contiguous() for key, value in encoder.timm_state_dict().items()}
    save_file(weights, str(out), metadata=metadata)
    result = ExportResult(out, target.checkpoint, encoder.arch, dict(encoder.timm_kwargs), target.run_id)
    if target.run_id is not None:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(out, Path(tmp, "encoder.safetensors"))
            description = {"arch": result.arch, "timm_kwargs": result.timm_kwargs,
                           "create_model": result.create_model_call("encoder.safetensors")}
            Path(tmp, "timm.json").write_text(json.dumps(description, indent=2))
            MlflowClient(target.tracking_uri).log_artifacts(target.run_id, tmp, "encoder")
    return result
