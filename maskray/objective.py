"""The Objective interface and registry (spec ``objectives.md`` section 9).

An objective is an ``nn.Module`` that owns the shared encoder (``self.encoder``) plus whatever heads,
decoders and teachers it needs, and turns a batch into a loss. DeepSpeed wraps the objective, so every
trainable parameter it owns is optimised. Objectives live in plugin modules (``objectives/<name>.py``)
and register themselves with :func:`register_objective`; the core never imports them by name.

Lookup order in :func:`get_objective`: already registered; entry points in the ``maskray.objectives``
group; then the module ``<package>.<name>`` of each package in ``$MASKRAY_PLUGINS`` (default
``objectives``), so dropping a file into ``objectives/`` is all a new objective needs.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from maskray.models import MaskedViT


class ObjectiveParams(BaseModel):
    """Base of every objective's own config section (``objective.*`` keys besides ``name``)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ObjectiveOutput:
    """loss: scalar to minimise; metrics: scalars to log (detached), e.g. loss parts."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module, ABC):
    """Base class. Subclasses set ``name`` and ``Config`` and implement :meth:`forward`.

    batch: ``{"image": (B, C, H, W) float, "label": (B,) int64, ...}`` as produced by the data pipeline.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[ObjectiveParams]] = ObjectiveParams

    def __init__(self, encoder: MaskedViT, params: ObjectiveParams) -> None:
        super().__init__()
        self.encoder = encoder
        self.params = params

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor], step: int) -> ObjectiveOutput:
        """Compute the loss (and metrics) of one micro-batch at optimizer step ``step``."""

    def figures(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Diagnostic matplotlib figures for a batch, ``{filename.png: figure}``. Default: none."""
        return {}

    def after_optimizer_step(self, step: int) -> None:
        """Hook after each optimizer step (EMA teachers, schedules). Default: nothing."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in ``named_parameters``) excluded from weight decay besides 1-D ones."""
        return {"encoder.vit.cls_token", "encoder.vit.pos_embed"}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two AdamW groups: decayed matrices, and undecayed biases/norms/tokens (timm's convention)."""
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


OBJECTIVES: dict[str, type[Objective]] = {}
T = TypeVar("T", bound=type[Objective])


def register_objective(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_objective("mae") class MAE(Objective): ...``."""

    def decorate(cls: T) -> T:
        if name in OBJECTIVES and OBJECTIVES[name] is not cls:
            raise ValueError(f"objective {name!r} is already registered by {OBJECTIVES[name].__module__}")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return decorate


def _plugin_packages() -> list[str]:
    return [pkg for pkg in os.environ.get("MASKRAY_PLUGINS", "objectives").split(",") if pkg]


def get_objective(name: str) -> type[Objective]:
    """Return the registered class for ``name``, loading plugins on demand; KeyError if unknown."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    for point in entry_points(group="maskray.objectives"):
        if point.name == name:
            point.load()
    for package in _plugin_packages():
        if name in OBJECTIVES:
            break
        try:
            importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as err:
            if err.name not in (package, f"{package}.{name}"):
                raise
    if name not in OBJECTIVES:
        known = ", ".join(sorted(OBJECTIVES)) or "none loaded"
        raise KeyError(f"unknown objective {name!r} (registered: {known}; plugins: {_plugin_packages()})")
    return OBJECTIVES[name]


def build_objective(name: str, params: dict[str, Any], encoder: MaskedViT) -> Objective:
    """Instantiate objective ``name`` around ``encoder`` with validated ``params``."""
    cls = get_objective(name)
    return cls(encoder, cls.Config.model_validate(params))
