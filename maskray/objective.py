"""The Objective interface and registry (spec ``objectives.md`` section 9).

An objective is an ``nn.Module`` that owns the shared encoder (``self.encoder``) plus its trainable heads and
decoders; DeepSpeed wraps it, so every parameter it owns is optimised and checkpointed. Everything else it
needs it declares, and the core provides:

- **inputs** (:meth:`Objective.inputs`): how a decoded sample becomes tensors in the loader processes, as a
  :class:`maskray.data.views.Views` (several crops of their own sizes, frame pairs, loader-made masks);
- **passes** (:meth:`Objective.passes`): which (view, mask) the backbone runs (:mod:`maskray.passes`); the core
  runs each distinct one once and hands the outputs to :meth:`Objective.loss`, so a composite of several
  objectives shares the backbone pass;
- **teachers** (:mod:`maskray.teachers`): ``EMATeacher`` / ``FrozenTeacher`` attributes are found by
  :meth:`Objective.teachers`, moved to the device, kept out of the optimizer and out of the DeepSpeed module;
  EMA teachers are updated after every optimizer step and saved with the checkpoint. A frozen teacher from a
  file or an earlier run is a :class:`~maskray.teacher_sources.TeacherSpec` field of the objective's Config
  (built with :func:`~maskray.teacher_sources.build_teacher`): :meth:`ObjectiveParams.teacher_specs` finds it,
  the driver resolves it, records it and pins its sha256 before any worker starts (:mod:`maskray.run_spec`), and
  :meth:`ObjectiveParams.resolved` makes its paths absolute;
- **checks** (:meth:`Objective.check_config` on the params, :meth:`Objective.check` on the built objective with the
  run's model and data): both run in the driver, so a bad setting exits 2 before any worker starts;
- **artifacts** (:meth:`Objective.export_artifacts`): files the run keeps in MLflow besides checkpoints;
- **state**: :meth:`Objective.extra_state` (queues, counters; identical on every rank) is checkpointed; each
  rank's generators are seeded from (seed, rank) and checkpointed by the core (:mod:`maskray.context`);
- **parameter groups** (:meth:`Objective.param_group_specs`): a learning-rate scale, weight decay or gradient
  clipping for the parameters under a name prefix; weight-decay exclusions come from every submodule's
  ``no_weight_decay()`` (timm's convention) plus 1-D parameters.

Objectives live in plugin modules (``objectives/<name>.py``) and register themselves with
:func:`register_objective`; the core never imports them by name. Lookup order in :func:`get_objective`: already
registered; the core's own (``composite``); entry points in the ``maskray.objectives`` group; then the module
``<package>.<name>`` of each package in ``$MASKRAY_PLUGINS`` (default ``objectives``).
:func:`load_all_objectives` imports all of them (``launch/pretrain.py --list-objectives``).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo

from maskray.config import describe_validation_error
from maskray.context import StepContext
from maskray.errors import ConfigError
from maskray.models import MaskedViT
from maskray.passes import EncoderPass, PassOutput, run_passes
from maskray.teacher_sources import LocatedSource, TeacherSpec
from maskray.teachers import EMATeacher, Teacher

if TYPE_CHECKING:
    from pathlib import Path

    from maskray.config import Config, DataConfig, ModelConfig
    from maskray.data.views import Views


class ObjectiveParams(BaseModel):
    """Base of every objective's own config section (``objective.*`` keys besides ``name``).

    Fields may hold :class:`~maskray.teacher_sources.LocatedSource` values (frozen teachers, tokenizers: local
    files or MLflow runs), other objectives' params (a composite's parts) or lists of them: :meth:`map_sources`
    walks all of them with their config keys, so path resolution, the driver's teacher records and the sha256
    pins need no per-objective code."""

    model_config = ConfigDict(extra="forbid")

    def map_sources(self, where: str, change: Callable[[str, LocatedSource], LocatedSource]) -> ObjectiveParams:
        """A copy in which every located source ``value`` under config key ``key`` is ``change(key, value)``."""
        return _map_sources(self, where, change)

    def resolved(self, base: Path, tracking_uri: str) -> ObjectiveParams:
        """A copy whose teachers and tokenizers have absolute paths (relative to ``base``) and a fixed MLflow store
        (:meth:`LocatedSource.resolved`), for workers that run elsewhere."""
        return self.map_sources("", lambda _, source: source.resolved(base, tracking_uri))

    def teacher_specs(self, where: str) -> dict[str, TeacherSpec]:
        """The frozen teachers these params name, by config key (``objective.teacher``,
        ``objective.parts[1].teacher``)."""
        found: dict[str, TeacherSpec] = {}

        def collect(key: str, source: LocatedSource) -> LocatedSource:
            if isinstance(source, TeacherSpec):
                found[key] = source
            return source

        self.map_sources(where, collect)
        return found

    def with_teacher_sha256(self, sha256: Mapping[str, str], where: str) -> ObjectiveParams:
        """A copy whose teacher specs carry the sha256 the driver resolved (by config key, as
        :meth:`teacher_specs`): a worker that loads other weights stops
        (:func:`~maskray.teacher_sources.build_teacher`)."""

        def pin(key: str, source: LocatedSource) -> LocatedSource:
            if isinstance(source, TeacherSpec):
                return source.model_copy(update={"sha256": sha256[key]})
            return source

        return self.map_sources(where, pin)


def _map_sources(value: Any, where: str, change: Callable[[str, LocatedSource], LocatedSource]) -> Any:
    """``value`` with each located source inside it replaced by ``change(config key, source)``. A model whose
    class names an ``INLINE_FIELD`` (a composite part's ``params``) lends that field its own key."""
    if isinstance(value, LocatedSource):
        return change(where, value)
    if isinstance(value, list):
        items = [_map_sources(item, f"{where}[{index}]", change) for index, item in enumerate(value)]
        return items if any(new is not old for new, old in zip(items, value, strict=True)) else value
    if isinstance(value, BaseModel):
        inline = getattr(type(value), "INLINE_FIELD", None)
        update = {}
        for name, field_value in value:
            key = where if name == inline else f"{where}.{name}".lstrip(".")
            new = _map_sources(field_value, key, change)
            if new is not field_value:
                update[name] = new
        return value.model_copy(update=update) if update else value
    return value


class ObjectiveOutput(NamedTuple):
    """loss: scalar to minimise; metrics: detached scalars averaged over ranks and logged (loss parts, ...).

    A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 finds the tensors of a module's output to hook its backward
    (it cannot look inside dataclasses), which parameters owned by the objective itself need.
    """

    loss: torch.Tensor
    metrics: Mapping[str, torch.Tensor] = MappingProxyType({})


@dataclass(frozen=True)
class ParamGroupSpec:
    """Optimizer settings for the parameters whose name starts with ``prefix`` (as in ``named_parameters``; the
    longest matching prefix wins): ``lr_scale`` multiplies the schedule's learning rate, ``weight_decay`` replaces
    ``optim.weight_decay`` for its decayed parameters, ``max_grad_norm`` clips the group's gradient norm (after
    the global ``optim.clip_grad``)."""

    prefix: str
    lr_scale: float = 1.0
    weight_decay: float | None = None
    max_grad_norm: float | None = None


class Objective(nn.Module, ABC):
    """Base class. Subclasses set ``Config``, declare :meth:`passes` and implement :meth:`loss`.

    batch: ``{"key": [...], "label": (B,), <the entries of inputs()>}`` on the device, floating tensors in the
    engine's compute dtype.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[ObjectiveParams]] = ObjectiveParams

    def __init__(self, encoder: MaskedViT, params: ObjectiveParams) -> None:
        super().__init__()
        self.encoder = encoder
        self.params = params

    @classmethod
    def check_config(cls, config: ObjectiveParams, where: str) -> None:
        """Checks of the params alone beyond :attr:`Config`; raise ConfigError naming the key under ``where``.
        Default: every located source's ``check`` (a teacher's keys that do not fit its source, a tokenizer's)."""

        def check(key: str, source: LocatedSource) -> LocatedSource:
            source.check(key)
            return source

        config.map_sources(where, check)

    def check(self, model: ModelConfig, data: DataConfig, where: str) -> None:
        """Checks that need the built objective with the run's model and data (a mask that must tile the patch
        grid, a teacher whose grid must match the encoder's); raise ConfigError naming the key under ``where``.
        The driver calls it once on the objective it builds for the run specification
        (:func:`maskray.run_spec.build_run_spec`), before any worker starts. Default: none."""

    # -- inputs and the step ---------------------------------------------------------------------------------------
    def inputs(self, model: ModelConfig, data: DataConfig) -> Views:
        """The sample transform run in the loader processes. Default: one training crop as ``"image"``."""
        from maskray.data.transforms import ImageTransform
        from maskray.data.views import Views

        return Views(image=ImageTransform.for_training(model, data))

    def passes(self) -> dict[str, EncoderPass]:
        """The backbone passes :meth:`loss` needs, by name. Default: none (the objective calls what it needs)."""
        return {}

    @abstractmethod
    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        """The loss of one micro-batch from the outputs of :meth:`passes` (``{pass name: PassOutput}``)."""

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        return self.loss(batch, run_passes(self.encoder, batch, self.passes(), ctx.generator), ctx)

    # -- state -----------------------------------------------------------------------------------------------------
    def teachers(self) -> dict[str, Teacher]:
        """Every :class:`~maskray.teachers.Teacher` attribute of this objective and of objectives inside it
        (composite parts), by dotted name."""
        found: dict[str, Teacher] = {}
        for prefix, module in self.named_modules():
            if isinstance(module, Objective):
                for attribute, value in vars(module).items():
                    if isinstance(value, Teacher):
                        found[f"{prefix}.{attribute}" if prefix else attribute] = value
        return found

    def after_optimizer_step(self, ctx: StepContext) -> dict[str, float]:
        """After each optimizer step (once per step, not per micro-batch): update every EMA teacher with its
        schedule. Returns ``{"momentum/<teacher>": m}`` for logging. Collective under ZeRO-3: all ranks call it."""
        return {
            f"momentum/{name}": teacher.update(ctx.step, ctx.total_steps)
            for name, teacher in self.teachers().items()
            if isinstance(teacher, EMATeacher)
        }

    def extra_state(self) -> dict[str, torch.Tensor]:
        """State beyond parameters, buffers and teachers that must survive a resume (identical on every rank:
        rank 0's copy is saved). Default: none."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`extra_state` exactly."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no extra state, got {sorted(state)}")

    def eval_encoder(self) -> nn.Module:
        """The encoder that evaluation and export use (e.g. an EMA target encoder's ``module``). Default: the
        trained encoder."""
        return self.encoder

    def figures(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Diagnostic matplotlib figures for a batch, ``{filename.png: figure}``. Default: none."""
        return {}

    def export_artifacts(self, directory: Path, config: Config) -> None:
        """Write files that outlive the run into ``directory`` (e.g. a trained tokenizer that a later run
        loads); the worker logs them as the run's MLflow artifacts after the last step (rank 0, parameters
        gathered under ZeRO-3). ``config``: the run's config. Default: none."""

    # -- optimizer -------------------------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides 1-D ones: every submodule's own
        ``no_weight_decay()`` (timm's ``VisionTransformer`` names its position embedding and tokens), prefixed."""
        names: set[str] = set()
        for prefix, module in self.named_modules():
            if module is not self and not isinstance(module, Objective) and hasattr(module, "no_weight_decay"):
                names |= {f"{prefix}.{name}" for name in module.no_weight_decay()}
        return names

    def param_group_specs(self) -> list[ParamGroupSpec]:
        """The objective's own parameter groups (the one hook for them). Default: none."""
        return []

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: per :class:`ParamGroupSpec` (and one for the rest), decayed matrices and undecayed
        biases / norms / tokens. Each group carries ``lr_scale`` and ``max_grad_norm`` for the engine."""
        skip = self.no_weight_decay()
        specs = sorted(self.param_group_specs(), key=lambda spec: -len(spec.prefix))
        groups: dict[tuple[int, bool], dict[str, Any]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            index = next((i for i, spec in enumerate(specs) if name.startswith(spec.prefix)), -1)
            spec = specs[index] if index >= 0 else ParamGroupSpec("")
            decay = not (param.ndim <= 1 or name in skip)
            group = groups.setdefault((index, decay), {
                "params": [],
                "weight_decay": (weight_decay if spec.weight_decay is None else spec.weight_decay) if decay else 0.0,
                "lr_scale": spec.lr_scale,
                "max_grad_norm": spec.max_grad_norm,
            })
            group["params"].append(param)
        return list(groups.values())


OBJECTIVES: dict[str, type[Objective]] = {}
T = TypeVar("T", bound=type[Objective])
CORE_OBJECTIVES = {"composite": "maskray.composite"}


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
    if name in CORE_OBJECTIVES:
        importlib.import_module(CORE_OBJECTIVES[name])
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


def load_all_objectives() -> dict[str, type[Objective]]:
    """Import every objective there is and return the registry, sorted by name: the core's, the entry points of
    the ``maskray.objectives`` group, and every module of each ``$MASKRAY_PLUGINS`` package (found with
    ``pkgutil.iter_modules``; a package that is not installed is skipped, as :func:`get_objective` does)."""
    for module in CORE_OBJECTIVES.values():
        importlib.import_module(module)
    for point in entry_points(group="maskray.objectives"):
        point.load()
    for package in _plugin_packages():
        try:
            imported = importlib.import_module(package)
        except ModuleNotFoundError as err:
            if err.name != package:
                raise
            continue
        for info in pkgutil.iter_modules(getattr(imported, "__path__", [])):
            importlib.import_module(f"{package}.{info.name}")
    return dict(sorted(OBJECTIVES.items()))


def validate_objective(name: str, params: dict[str, Any], where: str = "objective") -> ObjectiveParams:
    """The typed config of objective ``name`` (composite parts typed too); ConfigError naming ``<where>.name`` or
    ``<where>.<key>``. Validators of nested objectives read ``where`` from the validation context."""
    try:
        cls = get_objective(name)
    except KeyError as err:
        raise ConfigError(f"key '{where}.name': {err.args[0]}") from None
    try:
        config = cls.Config.model_validate(params, context={"where": where})
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, where)) from None
    cls.check_config(config, where)
    return config.map_sources(where, lambda key, source: source.keyed(key))


def context_where(info: ValidationInfo, default: str = "objective") -> str:
    """The config key a nested objective's params are validated under (:func:`validate_objective`'s ``where``)."""
    return (info.context or {}).get("where", default)


def build_objective(name: str, params: ObjectiveParams | Mapping[str, Any], encoder: MaskedViT) -> Objective:
    """Instantiate objective ``name`` around ``encoder`` with its typed ``params`` (a worker's, from the run
    specification), or with raw keys that are validated first (:func:`validate_objective`: tests, tools)."""
    cls = get_objective(name)
    if not isinstance(params, ObjectiveParams):
        params = validate_objective(name, dict(params))
    if not isinstance(params, cls.Config):
        raise TypeError(f"objective {name!r} takes {cls.Config.__name__}, got {type(params).__name__}")
    return cls(encoder, params)
