"""The run specification: a run's configuration resolved and checked once, in the driver, then handed to every
worker as is.

:func:`build_run_spec` turns a :class:`~maskray.config.Config` (the core's sections, validated by
:func:`~maskray.config.load_config`) into a :class:`RunSpec`:

1. local paths absolute and the MLflow store fixed (:meth:`Config.resolved`), the objective's keys validated into
   its typed params (a composite's parts too: :func:`~maskray.objective.validate_objective`) with their teachers'
   and tokenizers' paths absolute;
2. the encoder built (``model.init_from`` loaded, its sha256 recorded) and the objective built around it on the
   CPU, as a worker builds it: every frozen teacher is resolved once here and its sha256 recorded as the run's
   params ``<key>.sha256`` and pinned in the typed params, so a worker that loads other weights stops;
3. the objective's own checks that need the model and data (:meth:`~maskray.objective.Objective.check`: a mask
   block that does not tile the patch grid, a teacher on another grid) and its loader transform built once;
4. the data checked (shards, channels, normalisation, the evaluation sets: :func:`check_data`).

Every failure is a one-line :class:`~maskray.errors.ConfigError` or :class:`~maskray.errors.DataError` naming
the key, raised before Ray starts. Workers read :attr:`RunSpec.objective` and never validate again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from maskray.config import Config, ObjectiveConfig, project_root, zero_stage
from maskray.data import resolve_shards
from maskray.data.reader import first_sample
from maskray.data.sample import image_array
from maskray.data.transforms import channel_stats
from maskray.errors import ConfigError, DataError
from maskray.eval.protocol import eval_shard_sets
from maskray.models import build_encoder, load_pretrained
from maskray.objective import ObjectiveParams, build_objective, validate_objective
from maskray.teacher_sources import teacher_run_record
from maskray.teachers import FrozenTeacher


@dataclass(frozen=True)
class RunSpec:
    """config: the run's configuration, paths absolute, ``config.objective`` holding the objective's keys as
    given (paths resolved: what MLflow and checkpoints record); objective: the same keys as the objective's typed
    params (composite parts typed too), each frozen teacher's sha256 pinned; params / tags: the MLflow run's."""

    config: Config
    objective: ObjectiveParams
    params: dict[str, Any]
    tags: dict[str, str]


def check_normalisation(config: Config) -> None:
    """ConfigError naming the key when ``data.mean`` / ``data.std`` do not give one value per ``model.in_chans``
    channel (checked before the objective builds its transforms from them)."""
    try:
        channel_stats(config.data.mean, config.data.std, config.model.in_chans)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_data(config: Config) -> None:
    """Check the shards and evaluation sets: one line naming the key (DataError with the path)."""
    shards = resolve_shards(config.data.shards, key="data.shards")
    channels = config.model.in_chans
    if channels not in (1, 3):  # 1 and 3 convert any image through PIL; other counts must match the data
        sample = first_sample(shards)
        found = image_array(sample.image_or_bands()).shape[-1] if sample is not None else None
        if found != channels:
            where = f"sample '{sample.key}' of '{sample.url}'" if sample is not None else f"'{shards.urls[0]}'"
            raise DataError(f"data.shards: {where} has {found} channels but model.in_chans is {channels}")
    eval_shard_sets(config.eval)


def build_run_spec(config: Config, check_data_too: bool = True) -> RunSpec:
    """Resolve and check ``config`` as described in the module docstring (``check_data_too=False`` skips the
    data checks, for a spec whose data is checked by its caller)."""
    config = config.resolved()
    name = config.objective.name
    typed = validate_objective(name, config.objective.params).resolved(project_root(), config.tracking.uri)
    config = config.model_copy(update={"objective": ObjectiveConfig(
        name=name, **typed.model_dump(mode="json", exclude_unset=True))})
    check_normalisation(config)
    params, tags = config.flat(), config.run_tags()
    params["deepspeed.zero_stage"] = zero_stage(config.train, config.scaling.workers)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        encoder = build_encoder(config.model)
        if config.model.init_from:
            params["model.init_from_sha256"] = load_pretrained(encoder, config.model.init_from).sha256
        objective = build_objective(name, typed, encoder)
    objective.check(config.model, config.data, "objective")
    objective.inputs(config.model, config.data)

    built = [teacher for teacher in objective.teachers().values()
             if isinstance(teacher, FrozenTeacher) and teacher.spec is not None]
    pinned: dict[str, str] = {}
    for key, spec in typed.teacher_specs("objective").items():
        teacher = next(teacher for teacher in built if teacher.spec == spec)
        teacher_params, teacher_tags = teacher_run_record(teacher, key)
        params.update(teacher_params)
        tags.update(teacher_tags)
        pinned[key] = teacher.sha256
    if check_data_too:
        check_data(config)
    return RunSpec(config, typed.with_teacher_sha256(pinned, "objective"), params, tags)
