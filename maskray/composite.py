"""``composite``: a weighted sum of registered objectives sharing one backbone (spec ``objectives.md`` 9.4).

Declared in YAML::

    objective:
      name: composite
      parts:
        - {name: mae, weight: 1.0, mask_ratio: 0.75}
        - {name: moco_v3, weight: 0.5}

Each part is built around the same encoder (the composite owns it, parts hold a plain reference) and keeps its
own heads, teachers and schedules; its keys are validated by its own Config (errors name
``objective.parts[i].<key>``). A step collects every part's passes and
runs each distinct (view, mask) once (:func:`maskray.passes.run_passes`), hands each part its outputs, and returns
``sum_i weight_i * loss_i``. The inputs are the union of the parts' views (one entry per name: parts that declare
the same name must declare the same view). Metrics: ``<part>/loss`` (unweighted) and each part's metrics as
``<part>/<metric>``. A part is named after its objective (``mae``), numbered when a name repeats (``mae_1``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator

from maskray.context import StepContext
from maskray.errors import ConfigError
from maskray.models import MaskedViT
from maskray.objective import (
    Objective,
    ObjectiveOutput,
    ObjectiveParams,
    ParamGroupSpec,
    get_objective,
    objective_teacher_specs,
    register_objective,
    resolved_objective_params,
    validate_objective,
)
from maskray.passes import EncoderPass, PassOutput
from maskray.teacher_sources import TeacherSpec


class PartConfig(BaseModel):
    """One part: a registered objective ``name``, its ``weight``, and that objective's own keys."""

    model_config = ConfigDict(extra="allow")

    name: str
    weight: float = Field(1.0, ge=0.0)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CompositeParams(ObjectiveParams):
    parts: list[PartConfig] = Field(
        default_factory=lambda: [PartConfig(name="mae")], min_length=1,
        description="each {name: <objective>, weight: >= 0, <that objective's keys>}",
    )
    eval_part: str | None = Field(None, description="a part whose eval_encoder() evaluation and export use")

    @field_validator("parts")
    @classmethod
    def _no_nesting(cls, parts: list[PartConfig]) -> list[PartConfig]:
        if any(part.name == "composite" for part in parts):
            raise ValueError("a composite part cannot itself be a composite")
        return parts

    def resolved(self, base: Path, tracking_uri: str) -> CompositeParams:
        parts = [PartConfig(name=part.name, weight=part.weight,
                            **resolved_objective_params(part.name, part.params, base, tracking_uri))
                 for part in self.parts]
        return self.model_copy(update={"parts": parts})


def part_names(parts: list[PartConfig]) -> list[str]:
    """``mae``, ``moco_v3``; a repeated name is numbered from its second use (``mae``, ``mae_1``)."""
    seen: Counter[str] = Counter()
    names = []
    for part in parts:
        names.append(part.name if not seen[part.name] else f"{part.name}_{seen[part.name]}")
        seen[part.name] += 1
    return names


@register_objective("composite")
class Composite(Objective):
    Config = CompositeParams

    def __init__(self, encoder: MaskedViT, params: CompositeParams) -> None:
        super().__init__(encoder, params)
        names = part_names(params.parts)
        self.parts = nn.ModuleDict({
            name: get_objective(part.name)(encoder, validate_objective(part.name, part.params))
            for name, part in zip(names, params.parts, strict=True)
        })
        self.weights = {name: part.weight for name, part in zip(names, params.parts, strict=True)}
        for part in self.parts.values():  # the composite owns the shared encoder; parts keep a plain reference,
            del part._modules["encoder"]  # so it appears once in the module tree (DeepSpeed hooks, state dict)
            object.__setattr__(part, "encoder", encoder)

    @classmethod
    def teacher_specs(cls, config: CompositeParams, where: str) -> dict[str, TeacherSpec]:
        return {key: spec for index, part in enumerate(config.parts)
                for key, spec in objective_teacher_specs(part.name, part.params, f"{where}.parts[{index}]").items()}

    @classmethod
    def check_config(cls, config: CompositeParams, where: str) -> None:
        for index, part in enumerate(config.parts):
            validate_objective(part.name, part.params, where=f"{where}.parts[{index}]")
        names = part_names(config.parts)
        if config.eval_part is not None and config.eval_part not in names:
            raise ConfigError(f"key '{where}.eval_part': no part named {config.eval_part!r} (parts: {names})")

    def inputs(self, model, data):
        views = None
        for name, part in self.parts.items():
            try:
                views = part.inputs(model, data) if views is None else views.merge(part.inputs(model, data))
            except ValueError as err:
                raise ConfigError(f"objective.parts: part {name!r} declares a conflicting view: {err}") from None
        return views

    def passes(self) -> dict[str, EncoderPass]:
        return {f"{name}.{key}": spec for name, part in self.parts.items() for key, spec in part.passes().items()}

    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        total: torch.Tensor | float = 0.0
        metrics: dict[str, torch.Tensor] = {}
        for name, part in self.parts.items():
            own = {key[len(name) + 1 :]: value for key, value in outputs.items() if key.startswith(f"{name}.")}
            out = part.loss(batch, own, ctx)
            total = total + self.weights[name] * out.loss
            metrics[f"{name}/loss"] = out.loss.detach()
            metrics.update({f"{name}/{key}": value for key, value in out.metrics.items()})
        return ObjectiveOutput(loss=total, metrics=metrics)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": value for name, part in self.parts.items() for key, value in part.extra_state().items()
        }

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, part in self.parts.items():
            part.load_extra_state({key[len(name) + 1 :]: v for key, v in state.items() if key.startswith(f"{name}.")})

    def param_group_specs(self) -> list[ParamGroupSpec]:
        return [
            ParamGroupSpec(f"parts.{name}.{spec.prefix}", spec.lr_scale, spec.weight_decay, spec.max_grad_norm)
            for name, part in self.parts.items()
            for spec in part.param_group_specs()
        ]

    def eval_encoder(self) -> nn.Module:
        if self.params.eval_part is None:
            return self.encoder
        return self.parts[self.params.eval_part].eval_encoder()

    def figures(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {f"{name}_{file}": fig for name, part in self.parts.items() for file, fig in part.figures(batch).items()}

    def export_artifacts(self, directory, config) -> None:
        """Each part's artifacts under ``<directory>/<part name>``."""
        for name, part in self.parts.items():
            part.export_artifacts(directory / name, config)
