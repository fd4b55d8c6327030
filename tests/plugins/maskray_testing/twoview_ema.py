"""``twoview_ema``: a small two-view objective with an EMA teacher, for the platform tests.

The student encodes the visible half of view 0 (random drop mask), a predictor maps its mean-pooled tokens; the
EMA teacher encodes the whole view 1; the loss is ``2 - 2 cos``. It keeps a sample counter as extra state and,
with ``trace_dir`` set, appends one JSON line per micro-batch to ``<trace_dir>/rank<r>.jsonl``: step, micro
step, the kept patch ids, the counter, and a checksum of the teacher's state as they were at the first
forward of this process (to check that a resume restores them).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from maskray.context import StepContext
from maskray.objective import Objective, ObjectiveOutput, ObjectiveParams, ParamGroupSpec, register_objective
from maskray.passes import EncoderPass, MaskSpec, PassOutput
from maskray.schedules import cosine_schedule
from maskray.teachers import EMATeacher


class TwoViewParams(ObjectiveParams):
    mask_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    momentum: float = Field(0.9, ge=0.0, le=1.0)
    trace_dir: str | None = None


def teacher_checksum(state: dict[str, torch.Tensor]) -> float:
    """Sum of every entry of a teacher's state dict (float64)."""
    return float(sum(value.double().sum() for value in state.values()))


@register_objective("twoview_ema")
class TwoViewEMA(Objective):
    Config = TwoViewParams

    def __init__(self, encoder, params: TwoViewParams) -> None:
        super().__init__(encoder, params)
        self.predictor = nn.Linear(encoder.embed_dim, encoder.embed_dim)
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64), persistent=False)
        self.teacher = EMATeacher(encoder, functools.partial(cosine_schedule, start=params.momentum, end=1.0))
        self.first_checksum: float | None = None

    def inputs(self, model, data):
        from maskray.data.transforms import ImageTransform
        from maskray.data.views import MultiCrop, Views

        crop = ImageTransform.for_training(model, data)
        return Views(views=MultiCrop([crop, crop]))

    def passes(self) -> dict[str, EncoderPass]:
        return {"student": EncoderPass("views.0", MaskSpec("random", ratio=self.params.mask_ratio))}

    def param_group_specs(self) -> list[ParamGroupSpec]:
        return [ParamGroupSpec("predictor", lr_scale=0.5, max_grad_norm=1.0)]

    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        student = self.predictor(outputs["student"].out.patches.mean(dim=1))
        target = self.teacher(batch["views"][1]).patches.mean(dim=1)
        loss = (2 - 2 * F.cosine_similarity(student, target.to(student.dtype), dim=-1)).mean()
        self.seen += student.shape[0]
        if self.first_checksum is None:
            self.first_checksum = teacher_checksum(self.teacher.state_dict())
        if self.params.trace_dir:
            record = {"step": ctx.step, "micro": ctx.micro_step, "seen": int(self.seen),
                      "ids_keep": outputs["student"].indices.ids_keep.tolist(), "teacher": self.first_checksum}
            with open(Path(self.params.trace_dir, f"rank{ctx.rank}.jsonl"), "a") as handle:
                handle.write(json.dumps(record) + "\n")
        return ObjectiveOutput(loss=loss, metrics={"target_std": target.float().std(dim=0).mean().detach()})

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"seen": self.seen.detach().cpu().clone()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.seen.copy_(state["seen"])
