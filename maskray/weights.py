"""The exported weights file (``launch/export.py``): a timm state dict as safetensors plus what rebuilds it.

Metadata (strings, as safetensors requires): ``arch``, ``timm_kwargs`` (JSON: the ``timm.create_model``
overrides), ``init_kwargs`` (JSON: :attr:`MaskedViT.init_kwargs`, written since ``launch/embed.py``), the
``checkpoint`` and ``step`` it came from, and the run's input normalisation ``mean`` / ``std`` (JSON lists,
written since the frozen-teacher registry, :mod:`maskray.teacher_sources`). Files without ``init_kwargs`` (older
exports) are rebuilt from ``timm_kwargs``: every option that changes the state dict's keys or shapes is
recoverable from it; the absolute position embedding's kind (``sincos`` or ``learned``) is not, which does not
matter because its values are loaded from the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from maskray.errors import ConfigError
from maskray.models import MaskedViT, MaskedViTCfg

ARTIFACT_DIR = "encoder"  # a run's MLflow artifacts of its encoder: encoder.safetensors (this format), timm.json
RUN_ARTIFACT = f"{ARTIFACT_DIR}/encoder.safetensors"  # logged when a run finishes; launch/export.py rewrites it


def weights_metadata(
    encoder: MaskedViT, checkpoint: str | os.PathLike, step: int, mean: Sequence[float], std: Sequence[float]
) -> dict[str, str]:
    """The safetensors metadata of an export of ``encoder`` from ``checkpoint`` at ``step``, trained on inputs
    normalised with ``mean`` / ``std`` (its run's ``data.mean`` / ``data.std``)."""
    return {
        "format": "pt",
        "arch": encoder.arch,
        "timm_kwargs": json.dumps(encoder.timm_kwargs),
        "init_kwargs": json.dumps(encoder.init_kwargs),
        "checkpoint": str(checkpoint),
        "step": str(step),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
    }


def init_kwargs_from_timm(arch: str, timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """:class:`MaskedViT` arguments that rebuild an encoder exported with ``timm_kwargs`` (files before
    ``init_kwargs``); ``drop_path_rate`` is 0 (inference only) and ``pos_embed`` ``sincos`` unless disabled."""
    init_values = timm_kwargs.get("init_values", 0.0)
    shared, per_block = timm_kwargs.get("use_shared_rel_pos_bias", False), timm_kwargs.get("use_rel_pos_bias", False)
    rel_pos_bias = {(False, False): "none", (True, False): "shared", (False, True): "per_block",
                    (True, True): "both"}[(bool(shared), bool(per_block))]
    return dict(
        arch=arch,
        img_size=timm_kwargs["img_size"],
        patch_size=timm_kwargs["patch_size"],
        in_chans=timm_kwargs.get("in_chans", 3),
        depth=timm_kwargs.get("depth"),
        pos_embed="sincos" if timm_kwargs.get("use_abs_pos_emb", True) else "none",
        layer_scale=init_values or None,
        rel_pos_bias=rel_pos_bias,
    )


def read_weights_metadata(path: str | os.PathLike, key: str = "--weights") -> dict[str, str]:
    """The metadata of an exported weights file (ConfigError naming ``key`` when it is not one)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: '{file}' does not exist")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{key}: cannot read '{file}' as safetensors: {exc}") from None
    missing = [name for name in ("arch", "timm_kwargs") if name not in metadata]
    if missing:
        raise ConfigError(f"{key}: '{file}' has no {', '.join(missing)} in its metadata (not a maskray export)")
    return metadata


def weights_init_kwargs(metadata: dict[str, str]) -> dict[str, Any]:
    """The :class:`MaskedViT` arguments stored in (or derived from) an export's metadata."""
    if "init_kwargs" in metadata:
        return json.loads(metadata["init_kwargs"])
    return init_kwargs_from_timm(metadata["arch"], json.loads(metadata["timm_kwargs"]))


def load_weights(path: str | os.PathLike) -> MaskedViT:
    """The encoder of an exported weights file, its state dict loaded strictly."""
    encoder = MaskedViT(MaskedViTCfg(**weights_init_kwargs(read_weights_metadata(path))))
    try:
        encoder.vit.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"--weights: '{path}' does not match its metadata: {str(exc).splitlines()[0]}") from None
    return encoder

