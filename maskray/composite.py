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
from typing import Any, ClassVar

import torch
import torch.nn as nn
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from maskray.context import StepContext
from maskray.errors import ConfigError
from maskray.models import MaskedViT
from maskray.objective import (
    Objective,
    ObjectiveOutput,
    ObjectiveParams,
    ParamGroupSpec,
    context_where,
    get_objective,
    register_objective,
    validate_objective,
)
from maskray.passes import EncoderPass, PassOutput


class PartConfig(BaseModel):
    """One part: a registered objective ``name``, its ``weight``, and that objective's own typed ``params``
    (written inline in YAML, ``{name: mae, weight: 1, mask_ratio: 0.75}``, and dumped the same way)."""

    model_config = ConfigDict(extra="forbid")
    INLINE_FIELD: ClassVar[str] = "params"  # its keys sit beside name and weight (ObjectiveParams.map_sources)

    name: str
    weight: float = Field(1.0, ge=0.0)
    params: SerializeAsAny[ObjectiveParams]

    @classmethod
    def typed(cls, raw: Any, where: str) -> PartConfig:
        """A part from its YAML mapping, its keys validated by its objective's Config (errors name ``where``)."""
        if isinstance(raw, PartConfig):
            return raw
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ConfigError(f"key '{where}.name': each part is a mapping with an objective name")
        keys = {key: value for key, value in raw.items() if key not in ("name", "weight")}
        if raw["name"] == "composite":
            raise ConfigError(f"key '{where}.name': a composite part cannot itself be a composite")
        weight = raw.get("weight", 1.0)
        if not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"key '{where}.weight': must be a number >= 0, got {weight!r}")
        return cls(name=raw["name"], weight=weight, params=validate_objective(raw["name"], keys, where))

    @model_serializer(mode="plain")
    def _inline(self, info: SerializationInfo) -> dict[str, Any]:
        own = self.params.model_dump(mode=info.mode, exclude_unset=info.exclude_unset)
        return {"name": self.name, "weight": self.weight, **own}


class CompositeParams(ObjectiveParams):
    parts: list[PartConfig] = Field(
        default_factory=lambda: [{"name": "mae", "weight": 1.0}], min_length=1, validate_default=True,
        description="each {name: <objective>, weight: >= 0, <that objective's keys>}",
    )
    eval_part: str | None = Field(None, description="a part whose eval_encoder() evaluation and export use")

    @field_validator("parts", mode="before")
    @classmethod
    def _typed_parts(cls, parts: Any, info: ValidationInfo) -> Any:
        if not isinstance(parts, list):
            return parts  # pydantic names the type error
        where = context_where(info)
        return [PartConfig.typed(part, f"{where}.parts[{index}]") for index, part in enumerate(parts)]


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
            name: get_objective(part.name)(encoder, part.params)
            for name, part in zip(names, params.parts, strict=True)
        })
        self.weights = {name: part.weight for name, part in zip(names, params.parts, strict=True)}
        for part in self.parts.values():  # the composite owns the shared encoder; parts keep a plain reference,
            del part._modules["encoder"]  # so it appears once in the module tree (DeepSpeed hooks, state dict)
            object.__setattr__(part, "encoder", encoder)

    @classmethod
    def check_config(cls, config: CompositeParams, where: str) -> None:
        names = part_names(config.parts)
        if config.eval_part is not None and config.eval_part not in names:
            raise ConfigError(f"key '{where}.eval_part': no part named {config.eval_part!r} (parts: {names})")

    def check(self, model, data, where: str) -> None:
        for index, part in enumerate(self.parts.values()):
            part.check(model, data, f"{where}.parts[{index}]")

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
