"""``worker_error``: MAE that raises a ConfigError on one training worker only (never in the driver, which builds
the objective for the run specification too), for the fail-fast test: the run must end in one attempt, exit 2."""

from __future__ import annotations

import torch.distributed as dist
from pydantic import Field

from maskray.errors import ConfigError
from maskray.models import MaskedViT
from maskray.objective import register_objective
from maskray_testing import on_a_training_worker
from objectives.mae import MAE, MAEParams


class WorkerErrorParams(MAEParams):
    rank: int = Field(1, description="the worker rank that raises while building the objective")
    attempts_file: str = Field("", description="a file that gets one line per worker build (counts the attempts)")


@register_objective("worker_error")
class WorkerError(MAE):
    Config = WorkerErrorParams

    def __init__(self, encoder: MaskedViT, params: WorkerErrorParams) -> None:
        if on_a_training_worker():
            if params.attempts_file:
                with open(params.attempts_file, "a") as attempts:
                    attempts.write(f"rank {dist.get_rank()}\n")
            if dist.get_rank() == params.rank:
                raise ConfigError(f"key 'objective.rank': worker rank {params.rank} refuses to build")
        super().__init__(encoder, params)
