"""Evaluate a pretrained encoder as a Ray task and log the results into its MLflow run.

Target resolution (:func:`resolve_target`):

- ``run_id``: the MLflow run's param ``tracking.storage_path`` and tag ``maskray.run_name`` locate the Ray
  storage ``<storage_path>/<run_name>/checkpoint_*``; the checkpoint with the highest step (``ds/latest`` names
  the DeepSpeed tag ``step<N>``) and an ``encoder.safetensors`` is evaluated.
- ``checkpoint``: a checkpoint directory (``encoder.safetensors`` + ``model.json``); its run is the one tagged
  with the checkpoint's Ray run name (the parent directory) in the config's experiment, created once if missing.

Evaluations (``EVALUATIONS``): ``knn`` (DINO weighted k-NN, :func:`~maskray.eval.protocol.knn_metrics`),
``linear_probe`` (MAE head, SGD, :mod:`maskray.eval.linear_probe`; plus the same-seed random-init encoder,
logged at step 0 as ``linear_*_random_init`` like the k-NN baseline of training) and ``diagnostics``
(:mod:`maskray.eval.diagnostics` on the first ``diag_images`` images of ``eval.test_shards``, else
``data.shards``). Optional, not in the default set: ``finetune`` (end-to-end, MAE's recipe scaled down,
:mod:`maskray.eval.finetune`; plus the same-seed random-init encoder as ``finetune_*_random_init`` at step 0).

Logging: the driver validates the inputs, runs :func:`evaluate_checkpoint` as one Ray task (1 CPU, a GPU only
when the cluster has one), then logs every metric on the **parent run** at the checkpoint's step and again in
one **nested run per evaluation** (tags ``mlflow.parentRunId``, ``maskray.eval = <kind>`` and
``maskray.eval_settings = <hash of the protocol settings>``, which are also its params). Re-evaluating finds
those nested runs again by their tags and appends to them: no new top-level run, no duplicate child.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from maskray import storage
from maskray.checkpoint import (
    checkpoint_step,
    encoder_from_state,
    latest_checkpoint,
    read_checkpoint_config,
    read_encoder_state,
)
from maskray.config import Config, TrackingConfig
from maskray.data import ImageTransform, ShardSet, Views, build_loader, resolve_shards
from maskray.errors import ConfigError, MaskrayError
from maskray.eval.diagnostics import Diagnostics, diagnose, diagnostic_figure
from maskray.eval.finetune import FinetuneConfig, finetune
from maskray.eval.linear_probe import LinearProbeConfig, probe_metrics
from maskray.eval.protocol import eval_shard_sets, knn_metrics, num_classes, split_features
from maskray.models import MaskedViT, build_initial_encoder
from maskray.ray_env import ensure_ray
from maskray.tracking import RunLogger, find_or_create_run
from maskray.tracking.compare import check_store, store_exists
from maskray.tracking.mlflow_run import RUN_NAME_TAG, find_run

EVALUATIONS = ("knn", "linear_probe", "diagnostics")
OPTIONAL_EVALUATIONS = ("finetune",)
PARENT_TAG = "mlflow.parentRunId"
EVAL_TAG = "maskray.eval"
SETTINGS_TAG = "maskray.eval_settings"
T = TypeVar("T")


@dataclass(frozen=True)
class EvalTarget:
    """A checkpoint directory, the optimizer step it was saved at, and the MLflow run it belongs to."""

    checkpoint: str  # a local path or a filesystem URI
    step: int
    tracking_uri: str
    run_id: str | None


@dataclass(frozen=True)
class EvalSettings:
    """Which evaluations to run and their protocol knobs (k-NN's come from the run's ``eval`` config)."""

    kinds: tuple[str, ...] = EVALUATIONS
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    diag_images: int = 64
    train_shards: str | None = None
    test_shards: str | None = None


@dataclass
class EvalOutput:
    """What the Ray task returns: metrics per evaluation kind (at the checkpoint's step), random-init encoder
    metrics per evaluation kind (step 0) and the diagnostics arrays."""

    metrics: dict[str, dict[str, float]]
    random_init: dict[str, dict[str, float]]
    diagnostics: Diagnostics | None


def resolve_target(
    tracking_uri: str | None = None,
    run_id: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    create_run: bool = True,
) -> EvalTarget:
    """Resolve ``run_id`` and/or ``checkpoint`` into an :class:`EvalTarget` (see the module docstring).

    ``tracking_uri`` None: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db`` for a run id, the
    checkpoint config's store otherwise. With ``create_run=False`` a checkpoint without a run (or store) gets
    ``run_id`` None instead of a new run.
    """
    if run_id is None and checkpoint is None:
        raise ConfigError("give --run-id or --checkpoint")
    if run_id is None:
        path = storage.absolute(checkpoint)
        config = read_checkpoint_config(path)
        uri = tracking_uri or config.tracking.resolved_uri()
        if not create_run and not store_exists(uri):
            return EvalTarget(path, checkpoint_step(path) or 0, uri, None)
        client = MlflowClient(uri)
        run_name = storage.name(storage.parent(path))
        run_id = find_run(client, config.tracking.experiment, run_name)
        if run_id is None and create_run:
            run_id, _ = find_or_create_run(uri, config.tracking.experiment, run_name, config.flat(), config.run_tags())
            client.set_terminated(run_id, "FINISHED")
        return EvalTarget(path, _step(path, client, run_id), uri, run_id)

    uri = tracking_uri or TrackingConfig().resolved_uri()
    check_store(uri)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"--run-id: run '{run_id}' not found in {uri}") from None
    if checkpoint is not None:
        path = storage.absolute(checkpoint)
        read_checkpoint_config(path)
    else:
        storage_path = run.data.params.get("tracking.storage_path")
        run_name = run.data.tags.get(RUN_NAME_TAG)
        if storage_path is None or run_name is None:
            raise ConfigError(
                f"--run-id: run '{run_id}' has no param tracking.storage_path or tag {RUN_NAME_TAG}; pass --checkpoint"
            )
        path = latest_checkpoint(storage.join(storage.absolute(storage_path), run_name))
    return EvalTarget(path, _step(path, client, run_id), uri, run_id)


def _step(checkpoint: str, client: MlflowClient, run_id: str | None) -> int:
    """The checkpoint's step, else the run's last ``loss`` step, else 0."""
    step = checkpoint_step(checkpoint)
    if step is not None:
        return step
    history = client.get_metric_history(run_id, "loss") if run_id else []
    return max((metric.step for metric in history), default=0)


def first_images(shard_set: ShardSet, config: Config, count: int) -> torch.Tensor:
    """(count, C, H, W): the first ``count`` images of a shard set through the eval transform."""
    transform = Views(image=ImageTransform.for_eval(config.model, config.data))
    loader = build_loader(shard_set, transform, batch_size=count, num_workers=0, drop_last=False)
    return next(iter(loader))["image"][:count]


def _probe(
    encoder: MaskedViT,
    shard_sets: tuple[ShardSet, ShardSet],
    config: Config,
    probe: LinearProbeConfig,
    device: str,
) -> dict[str, float]:
    train, test = split_features(encoder, shard_sets, config, device)
    return probe_metrics(train, test, num_classes(shard_sets, train), config.eval.feature, probe)


def _finetune(
    encoder: MaskedViT,
    shard_sets: tuple[ShardSet, ShardSet],
    config: Config,
    settings: FinetuneConfig,
    device: str,
) -> dict[str, float]:
    train, test = (ImageTransform.for_training(config.model, config.data),
                   ImageTransform.for_eval(config.model, config.data))
    classes = max(shard_sets[0].num_classes, shard_sets[1].num_classes)
    accuracy = finetune(encoder, shard_sets, classes, train, test, settings, device)
    return {f"finetune_{key}": value for key, value in accuracy.items()}


def _random_init_encoder(config: Config, device: str) -> MaskedViT:
    """The training worker's initial encoder (built after seeding with ``train.seed``; ``model.init_from``'s
    weights when set)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        return build_initial_encoder(config.model).to(device)


def evaluate_checkpoint(
    checkpoint: str,
    config: Config,
    settings: EvalSettings,
    shard_sets: tuple[ShardSet, ShardSet] | None,
    diag_set: ShardSet | None,
) -> EvalOutput:
    """The Ray task body: load the encoder, run the evaluations in ``settings.kinds`` (inputs already validated)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = encoder_from_state(config, read_encoder_state(checkpoint)).to(device)
    metrics: dict[str, dict[str, float]] = {}
    random_init: dict[str, dict[str, float]] = {}
    diagnostics = None
    if {"knn", "linear_probe"} & set(settings.kinds):  # one feature pass serves both
        train, test = split_features(encoder, shard_sets, config, device)
        classes = num_classes(shard_sets, train)
    if "knn" in settings.kinds:
        metrics["knn"] = knn_metrics(train, test, classes, config.eval)
    if "linear_probe" in settings.kinds:
        metrics["linear_probe"] = probe_metrics(train, test, classes, config.eval.feature, settings.probe)
        if config.eval.random_init:
            probe = _probe(_random_init_encoder(config, device), shard_sets, config, settings.probe, device)
            random_init["linear_probe"] = {f"{key}_random_init": value for key, value in probe.items()}
    if "diagnostics" in settings.kinds:
        diagnostics = diagnose(encoder, first_images(diag_set, config, settings.diag_images))
        metrics["diagnostics"] = diagnostics.metrics()
    if "finetune" in settings.kinds:
        metrics["finetune"] = _finetune(encoder, shard_sets, config, settings.finetune, device)
        if config.eval.random_init:
            tuned = _finetune(_random_init_encoder(config, device), shard_sets, config, settings.finetune, device)
            random_init["finetune"] = {f"{key}_random_init": value for key, value in tuned.items()}
    return EvalOutput(metrics, random_init, diagnostics)


def _settings_by_kind(config: Config, settings: EvalSettings, shard_sets, diag_set) -> dict[str, dict[str, Any]]:
    """The protocol settings of each evaluation: params of its nested run and the key it is found by."""
    data = {} if shard_sets is None else {"train_shards": shard_sets[0].root, "test_shards": shard_sets[1].root}
    by_kind = {
        "knn": {"k": config.eval.knn_k, "temperature": config.eval.knn_temperature,
                "feature": config.eval.feature, **data},
        "linear_probe": {"optimizer": "sgd", **asdict(settings.probe), "feature": config.eval.feature, **data},
        "diagnostics": {"images": settings.diag_images, "shards": diag_set.root if diag_set else ""},
        "finetune": {"optimizer": "adamw", **asdict(settings.finetune), **data},
    }
    return {kind: by_kind[kind] for kind in settings.kinds}


def _nested_run(client: MlflowClient, parent, kind: str, settings: dict[str, Any]) -> str:
    """Find (by parent, kind and settings hash) or create the nested run of one evaluation."""
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    experiment_id = parent.info.experiment_id
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and tags.`{EVAL_TAG}` = '{kind}' "
        f"and tags.`{SETTINGS_TAG}` = '{key}'",
        max_results=1,
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {PARENT_TAG: parent.info.run_id, EVAL_TAG: kind, SETTINGS_TAG: key}
    child = client.create_run(experiment_id, run_name=f"{parent.info.run_name}-{kind}", tags=tags)
    client.log_batch(child.info.run_id, params=[Param(name, str(value)) for name, value in settings.items()])
    return child.info.run_id


def log_evaluation(target: EvalTarget, output: EvalOutput, settings: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Log ``output`` into the target run and its nested runs; returns every metric logged on the parent."""
    client = MlflowClient(target.tracking_uri)
    parent = client.get_run(target.run_id)
    parent_logger = RunLogger(target.tracking_uri, target.run_id)
    logged: dict[str, float] = {}
    for kind, metrics in output.metrics.items():
        child_logger = RunLogger(target.tracking_uri, _nested_run(client, parent, kind, settings[kind]))
        for logger in (parent_logger, child_logger):
            logger.log_metrics(metrics, target.step)
            if output.random_init.get(kind):
                logger.log_metrics(output.random_init[kind], 0)
        logged.update(metrics)
        logged.update(output.random_init.get(kind, {}))
        if kind == "diagnostics":
            buffer = io.BytesIO()
            title = f"{parent.info.run_name} @ step {target.step}"
            diagnostic_figure(output.diagnostics, title).savefig(buffer, format="png", dpi=120, bbox_inches="tight")
            child_logger.log_bytes(buffer.getvalue(), "diagnostics.png")
            child_logger.log_bytes(json.dumps(output.diagnostics.to_json()).encode(), "diagnostics.json")
            parent_logger.log_bytes(buffer.getvalue(), "diagnostics.png", artifact_path="eval")
        client.set_terminated(child_logger.run_id, "FINISHED")
    parent_logger.set_tags({"maskray.eval_checkpoint": str(target.checkpoint), "maskray.eval_step": target.step})
    return logged


def evaluate(target: EvalTarget, settings: EvalSettings = EvalSettings()) -> dict[str, float]:
    """Validate the inputs, run :func:`evaluate_checkpoint` as a Ray task (a local Ray is started when none
    is running), log into the target run; returns the metrics logged on it."""
    known = EVALUATIONS + OPTIONAL_EVALUATIONS
    unknown = sorted(set(settings.kinds) - set(known))
    if unknown or not settings.kinds:
        raise ConfigError(f"--only: unknown evaluation(s) {unknown or '(none given)'}; choose from {known}")
    if target.run_id is None:
        raise ConfigError(f"checkpoint '{target.checkpoint}' has no MLflow run to log into")
    config = read_checkpoint_config(target.checkpoint)
    if settings.train_shards:
        config.eval.train_shards = settings.train_shards
    if settings.test_shards:
        config.eval.test_shards = settings.test_shards
    shard_sets = None
    if {"knn", "linear_probe", "finetune"} & set(settings.kinds):
        shard_sets = eval_shard_sets(config.eval)
        if shard_sets is None:
            raise ConfigError("eval.train_shards / eval.test_shards are not set: pass --train-shards and --test-shards")
    diag_set = None
    if "diagnostics" in settings.kinds:
        if config.eval.test_shards:
            diag_set = resolve_shards(config.eval.test_shards, key="eval.test_shards")
        else:
            diag_set = resolve_shards(config.data.shards, key="data.shards")

    output = run_as_task(evaluate_checkpoint, str(target.checkpoint), config, settings, shard_sets, diag_set)
    return log_evaluation(target, output, _settings_by_kind(config, settings, shard_sets, diag_set))


def run_as_task(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` run as one Ray task (1 CPU, a GPU only when the cluster has one; a local Ray starts,
    its workers' output shown here, when none is running). A :class:`MaskrayError` it raises is re-raised here."""
    import ray
    from ray.exceptions import RayTaskError

    ensure_ray()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(function)
    try:
        return ray.get(task.remote(*args))
    except RayTaskError as err:
        if isinstance(err.cause, MaskrayError):
            raise err.cause from None
        raise
