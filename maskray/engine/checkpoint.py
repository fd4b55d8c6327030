"""Checkpoints: every rank's DeepSpeed shard plus, from rank 0, the encoder as a timm state dict.

Layout of one reported checkpoint (Ray merges the per-rank directories):
``ds/<tag>/...`` DeepSpeed files (each rank writes its own ZeRO shard), ``ds/latest``,
``encoder.safetensors`` (timm-loadable encoder weights, fp32) and ``model.json`` (the run config).
The global step and the MLflow run id travel in DeepSpeed's ``client_state``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from maskray.config import Config
from maskray.models import MaskedViT, build_encoder

DEEPSPEED_DIR = "ds"
ENCODER_FILE = "encoder.safetensors"
CONFIG_FILE = "model.json"


def save_checkpoint(
    engine, directory: str, step: int, run_id: str, encoder_weights: dict | None, config: Config
) -> None:
    """Write this rank's part of the checkpoint for ``step`` (optimizer steps done) into ``directory``.

    ``encoder_weights`` is given on rank 0 only.
    """
    engine.save_checkpoint(
        os.path.join(directory, DEEPSPEED_DIR), tag=f"step{step}", client_state={"step": step, "mlflow_run_id": run_id}
    )
    if encoder_weights is not None:
        weights = {key: value.contiguous() for key, value in encoder_weights.items()}
        save_file(weights, os.path.join(directory, ENCODER_FILE))
        Path(directory, CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json"), indent=2))


def load_checkpoint(engine, directory: str) -> tuple[int, str]:
    """Restore model, optimizer and scheduler state; returns ``(step, mlflow_run_id)``."""
    _, client_state = engine.load_checkpoint(os.path.join(directory, DEEPSPEED_DIR))
    if client_state is None:
        raise RuntimeError(f"no DeepSpeed checkpoint could be loaded from {directory}")
    return int(client_state["step"]), str(client_state["mlflow_run_id"])


def encoder_from_state(config: Config, state: dict[str, torch.Tensor]) -> MaskedViT:
    """A fresh encoder with ``state`` (a timm state dict) loaded strictly."""
    encoder = build_encoder(config.model)
    encoder.vit.load_state_dict(state, strict=True)
    return encoder


def load_encoder(directory: str | os.PathLike) -> tuple[MaskedViT, Config]:
    """Load the encoder and config stored in a checkpoint directory."""
    config = Config.model_validate(json.loads(Path(directory, CONFIG_FILE).read_text()))
    return encoder_from_state(config, load_file(str(Path(directory, ENCODER_FILE)))), config
