"""The checkpoint directory format and its read side (evaluation, export and training all use it).

Layout of one reported checkpoint (Ray merges the per-rank directories):

- ``ds/<tag>/...``: DeepSpeed files (each rank writes its own ZeRO shard), ``ds/latest`` names the tag ``step<N>``;
- ``encoder.safetensors``: the encoder that evaluation and export use, as a timm state dict in fp32;
- ``model.json``: the run config;
- ``objective_state.pt`` (from rank 0): the objective's teachers and extra state, and ``rng/rank<r>.pt``: each
  rank's generator states (written since the objective platform; older checkpoints lack them).

A checkpoint or run directory is a local path or a filesystem URI (``s3://...``, ``gs://...``; see
:mod:`maskray.storage`), wherever ``tracking.storage_path`` put it.

Writing belongs to :mod:`maskray.engine.training_state`; everything here only reads.
"""

from __future__ import annotations

import json
import os
import stat

import torch
from safetensors.torch import load

from maskray import storage
from maskray.config import Config
from maskray.errors import ConfigError
from maskray.models import MaskedViT, build_encoder

DEEPSPEED_DIR = "ds"
ENCODER_FILE = "encoder.safetensors"
CONFIG_FILE = "model.json"
OBJECTIVE_STATE_FILE = "objective_state.pt"
RNG_DIR = "rng"


def refuse_writable_by_others(directory: str | os.PathLike, key: str = "checkpoint") -> None:
    """A ConfigError when a local ``directory`` or anything in it is writable by its group or by everyone.

    DeepSpeed's checkpoint loading unpickles (its checkpoint engine turns weights-only loading off), and unpickling
    runs code: a checkpoint that another user could have replaced must not be loaded. Storage URIs (``s3://``, ...)
    are not checked here: their access control is the bucket's, which must be trusted (see the README)."""
    if storage.is_uri(directory) or not os.path.isdir(directory):
        return
    for root, dirs, files in os.walk(directory):
        for name in [".", *dirs, *files]:
            path = os.path.normpath(os.path.join(root, name))
            mode = os.lstat(path).st_mode
            if mode & (stat.S_IWGRP | stat.S_IWOTH) and not stat.S_ISLNK(mode):
                raise ConfigError(
                    f"{key}: '{path}' is writable by {'everyone' if mode & stat.S_IWOTH else 'its group'} "
                    f"(mode {stat.S_IMODE(mode):o}); checkpoints are unpickled when loaded, so maskray loads only "
                    f"ones that nobody else can change: chmod -R go-w '{directory}'"
                )


def encoder_from_state(config: Config, state: dict[str, torch.Tensor]) -> MaskedViT:
    """A fresh encoder with ``state`` (a timm state dict) loaded strictly."""
    encoder = build_encoder(config.model)
    encoder.vit.load_state_dict(state, strict=True)
    return encoder


def read_checkpoint_config(checkpoint: str | os.PathLike) -> Config:
    """The run config stored in a checkpoint directory (a local path or a filesystem URI, see
    :mod:`maskray.storage`); ConfigError when it is not a maskray checkpoint."""
    location = storage.absolute(checkpoint)
    for name in (CONFIG_FILE, ENCODER_FILE):
        if not storage.is_file(storage.join(location, name)):
            raise ConfigError(f"--checkpoint: '{location}' has no {name} (not a maskray checkpoint)")
    return Config.model_validate(json.loads(storage.read_text(storage.join(location, CONFIG_FILE))))


def load_encoder(directory: str | os.PathLike) -> tuple[MaskedViT, Config]:
    """Load the encoder and config stored in a checkpoint directory (a local path or a URI)."""
    config = read_checkpoint_config(directory)
    return encoder_from_state(config, read_encoder_state(directory)), config


def read_encoder_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The timm state dict in a checkpoint's ``encoder.safetensors``."""
    return load(storage.read_bytes(storage.join(storage.absolute(directory), ENCODER_FILE)))


def checkpoint_step(directory: str | os.PathLike) -> int | None:
    """The step of a maskray checkpoint from ``ds/latest`` (``step<N>``), None when it has none."""
    latest = storage.join(storage.absolute(directory), DEEPSPEED_DIR, "latest")
    if not storage.is_file(latest):
        return None
    tag = storage.read_text(latest).strip()
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


def latest_checkpoint(run_dir: str | os.PathLike) -> str:
    """The ``checkpoint_*`` directory of a Ray run directory (a local path or a URI) with the highest step that
    holds an encoder."""
    root = storage.absolute(run_dir)
    candidates = [storage.join(root, name) for name in storage.list_dir(root) if name.startswith("checkpoint_")]
    candidates = [path for path in candidates if storage.is_file(storage.join(path, ENCODER_FILE))]
    if not candidates:
        raise ConfigError(f"no checkpoint with {ENCODER_FILE} under '{run_dir}'")
    return max(candidates, key=lambda path: (checkpoint_step(path) or -1, storage.name(path)))
