"""``nan_mae``: MAE whose loss is NaN for the first ``nan_at[s]`` forwards of this process at 0-based optimizer
step ``s``, on rank ``nan_rank`` only (null: every rank), for the non-finite loss tests."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import Field

from maskray.context import StepContext
from maskray.objective import ObjectiveOutput, register_objective
from maskray.passes import PassOutput
from objectives.mae import MAE, MAEParams


class NanMAEParams(MAEParams):
    nan_at: dict[int, int] = Field(default_factory=dict)
    nan_rank: int | None = None


@register_objective("nan_mae")
class NanMAE(MAE):
    Config = NanMAEParams

    def __init__(self, encoder, params: NanMAEParams) -> None:
        super().__init__(encoder, params)
        self.forwards_at: Counter[int] = Counter()

    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        out = super().loss(batch, outputs, ctx)
        params = self.params
        if ctx.step in params.nan_at and params.nan_rank in (None, ctx.rank):
            self.forwards_at[ctx.step] += 1
            if self.forwards_at[ctx.step] <= params.nan_at[ctx.step]:
                return ObjectiveOutput(loss=out.loss * float("nan"), metrics=out.metrics)
        return out
