"""Saving and restoring a worker's whole training state (the directory format is :mod:`maskray.checkpoint`).

Every rank writes its DeepSpeed shard (model, optimizer, LR scheduler; the step and MLflow run id in
``client_state``) and its generator states (``rng/rank<r>.pt``); rank 0 adds the objective's teachers and extra
state (``objective_state.pt``, identical on every rank), the evaluation encoder (``encoder.safetensors``) and
the config (``model.json``). Small state files are written with ``torch.save`` and read with
``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from maskray.checkpoint import (
    CONFIG_FILE,
    DEEPSPEED_DIR,
    ENCODER_FILE,
    OBJECTIVE_STATE_FILE,
    RNG_DIR,
    refuse_writable_by_others,
)
from maskray.config import Config
from maskray.context import RankRandomness
from maskray.objective import Objective

logger = logging.getLogger(__name__)


def save_training_state(
    engine,
    objective: Objective,
    randomness: RankRandomness,
    directory: str,
    step: int,
    run_id: str,
    rank: int,
    encoder_weights: dict[str, torch.Tensor] | None,
    config: Config,
) -> None:
    """Write this rank's part of the checkpoint for ``step`` (optimizer steps done) into ``directory``.

    ``encoder_weights`` (the evaluation encoder's timm state dict) is given on rank 0 only.
    """
    engine.save_checkpoint(
        os.path.join(directory, DEEPSPEED_DIR), tag=f"step{step}", client_state={"step": step, "mlflow_run_id": run_id}
    )
    Path(directory, RNG_DIR).mkdir(exist_ok=True)
    torch.save(randomness.state_dict(), Path(directory, RNG_DIR, f"rank{rank}.pt"))
    if rank == 0:
        teachers = {name: t.state_dict() for name, t in objective.teachers().items() if t.persistent}
        torch.save({"teachers": teachers, "extra": objective.extra_state()}, Path(directory, OBJECTIVE_STATE_FILE))
    if encoder_weights is not None:
        save_file({key: value.contiguous() for key, value in encoder_weights.items()}, Path(directory, ENCODER_FILE))
        Path(directory, CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json"), indent=2))


def load_training_state(
    engine, objective: Objective, randomness: RankRandomness, directory: str, rank: int
) -> tuple[int, str]:
    """Restore model, optimizer, scheduler, teachers, extra state and this rank's generators; returns
    ``(step, mlflow_run_id)``. Generators that the checkpoint lacks (another world size, or a checkpoint from
    before the objective platform) stay as seeded, with a warning. A directory that others can write is refused
    before DeepSpeed unpickles anything (:func:`~maskray.checkpoint.refuse_writable_by_others`)."""
    refuse_writable_by_others(directory)
    _, client_state = engine.load_checkpoint(os.path.join(directory, DEEPSPEED_DIR))
    if client_state is None:
        raise RuntimeError(f"no DeepSpeed checkpoint could be loaded from {directory}")
    state_file = Path(directory, OBJECTIVE_STATE_FILE)
    if state_file.is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        teachers = objective.teachers()
        for name, teacher_state in state["teachers"].items():
            teachers[name].load_state_dict(teacher_state)
        objective.load_extra_state(state["extra"])
    rng_file = Path(directory, RNG_DIR, f"rank{rank}.pt")
    if rng_file.is_file():
        randomness.load_state_dict(torch.load(rng_file, map_location="cpu", weights_only=True))
    else:
        logger.warning("checkpoint %s has no generator state for rank %d; generators stay freshly seeded",
                       directory, rank)
    return int(client_state["step"]), str(client_state["mlflow_run_id"])
