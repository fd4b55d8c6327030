"""The driver: validate everything, create the MLflow run, build the TorchTrainer, fit, report.

Runs wherever ``launch/pretrain.py`` runs: on a laptop it starts a local Ray; under ``ray job submit`` it
attaches to the cluster. Nothing here imports DeepSpeed (workers do). A worker that dies or raises restarts the
group from the latest checkpoint (``scaling.max_failures``); a SIGTERM to the driver has the workers checkpoint
and stop (:mod:`maskray.engine.stopping`), and :class:`~maskray.errors.Interrupted` says how to resume.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from maskray import storage
from maskray.checkpoint import checkpoint_step, latest_checkpoint, read_checkpoint_config, refuse_writable_by_others
from maskray.config import Config, project_root, zero_stage
from maskray.data.health import clear_stop_note, raise_if_stopped, stop_note_location
from maskray.errors import ConfigError, Interrupted, MaskrayError, TrainingStopped
from maskray.ray_env import ensure_ray
from maskray.run_spec import build_run_spec
from maskray.storage import make_dirs, resolve
from maskray.tracking import find_or_create_run, finish_run, run_metrics, run_url_hint, usable_tracking_uri
from maskray.tracking.redact import redact_uri_credentials

FALLBACK_STORE = "mlflow-fallback.db"  # under the project root: where a run is tracked when no server answers


@dataclass
class PretrainResult:
    run_id: str
    run_name: str
    tracking_uri: str
    metrics: dict[str, float]
    resumed: bool


def default_run_name(config: Config) -> str:
    return f"{config.objective.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_location(location: str):
    """``tracking.storage_path`` (a local path or a filesystem URI) as Ray Train's ``(storage_filesystem,
    storage_path)``, created if missing; a store that cannot be reached or created is a ConfigError."""
    try:
        make_dirs(location)
        return resolve(location)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"tracking.storage_path: cannot use '{location}': {first}") from None


def check_resume_layout(config: Config, run_name: str) -> None:
    """Refuse (ConfigError, before any worker starts) to resume a run under another world size or ZeRO stage
    than its latest checkpoint's (``scaling.workers`` and ``train.zero_stage`` in its ``model.json``): the
    DeepSpeed optimizer state is saved as one shard per rank in the stage's own layout and the data stream is
    split by rank, so the run resumes with its own worker count and stage."""
    try:
        checkpoint = latest_checkpoint(storage.join(config.tracking.storage_path, run_name))
    except ConfigError:  # nothing to resume
        return
    saved = read_checkpoint_config(checkpoint)
    where = f"run '{run_name}' was checkpointed with"
    if saved.scaling.workers != config.scaling.workers:
        raise ConfigError(
            f"scaling.workers: {where} {saved.scaling.workers} workers (step {checkpoint_step(checkpoint)}) and "
            f"cannot resume with {config.scaling.workers}; re-submit it with --workers {saved.scaling.workers} "
            "(or start a new run name from its weights with model.init_from)"
        )
    stage, wanted = zero_stage(saved.train, saved.scaling.workers), zero_stage(config.train, config.scaling.workers)
    if stage != wanted:
        raise ConfigError(
            f"train.zero_stage: {where} ZeRO stage {stage} (step {checkpoint_step(checkpoint)}) and cannot resume "
            f"with stage {wanted}; re-submit it with --set train.zero_stage={stage}"
        )


def _scaling(config: Config, workers: int):
    import ray
    from ray.train import ScalingConfig

    use_gpu = config.scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    resources = {"CPU": config.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources)


def run_pretraining(
    config: Config,
    run_name: str | None = None,
    max_steps: int | None = None,
    tags: Mapping[str, str] | None = None,
) -> PretrainResult:
    """Train ``config`` on Ray. Re-using ``run_name`` resumes that run (checkpoint and MLflow run).

    ``tags`` are added to a new run's tags (a sweep's trial: its parent run and sweep name). Attaches to a
    running Ray (a Tune trial, a cluster job) or starts a local one. Raises :class:`~maskray.errors.Interrupted`
    after a SIGTERM (the workers checkpointed) and :class:`~maskray.errors.TrainingStopped` when they stopped on
    non-finite losses; the MLflow run is then FAILED until a re-submission resumes it.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from maskray.engine.driver_stop import DriverStop
    from maskray.engine.worker import train_loop_per_worker

    spec = build_run_spec(config)
    config = spec.config
    run_name = run_name or default_run_name(config)
    tracking_uri = usable_tracking_uri(config.tracking.resolved_uri(), project_root() / FALLBACK_STORE)
    storage_filesystem, storage_path = storage_location(config.tracking.storage_path)
    check_resume_layout(config, run_name)
    run_id, resumed = find_or_create_run(
        tracking_uri, config.tracking.experiment, run_name, spec.params, {**spec.tags, **(tags or {})}
    )

    # a resume unpickles the run's checkpoints: refuse them before any worker starts if others can write them
    refuse_writable_by_others(storage.join(config.tracking.storage_path, run_name), "tracking.storage_path")
    stop_note = stop_note_location(config.tracking.storage_path, run_name)
    clear_stop_note(stop_note)
    ensure_ray()
    stop = DriverStop(run_id)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # the spec by reference: Ray Train's controller unpickles train_loop_config (its run context) without using
        # it, and the spec's typed classes would make it import the model stack, ~5 CPU-s per run
        train_loop_config={
            "spec": ray.put(spec),
            "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri,
            "max_steps": max_steps,
            "stop_request": stop.name,
        },
        scaling_config=_scaling(config, config.scaling.workers),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.scaling.checkpoints_to_keep),
        ),
    )
    stopped: str | MaskrayError | None = "failed"
    try:
        stopped = trainer.fit().return_value  # rank 0's: why the workers stopped early, if they did
        if not stopped and storage.is_file(stop_note):
            stopped = "bad data"
    finally:
        stop.close()
        finish_run(tracking_uri, run_id, not stopped)
    if isinstance(stopped, MaskrayError):  # a user error on a worker: every rank stopped, no restart
        raise stopped
    if stopped and stop.requested.is_set():
        raise Interrupted(f"{stopped}: run '{run_name}' checkpointed; re-submit it with --run-name {run_name} "
                          "to resume")
    raise_if_stopped(stop_note)  # the workers stopped early for bad data (data.max_bad_fraction)
    if stopped:
        raise TrainingStopped(stopped)
    return PretrainResult(run_id, run_name, tracking_uri, run_metrics(tracking_uri, run_id), resumed)


def summary_lines(result: PretrainResult) -> list[str]:
    """What the launcher prints at the end; the last line is ``mlflow_run_id=<id>``."""
    metrics = result.metrics
    lines = [f"run {result.run_name} ({'resumed' if result.resumed else 'new'}), "
             f"final loss {metrics.get('loss', float('nan')):.4f}"]
    if "knn_top1" in metrics:
        lines.append(f"k-NN top-1 (pretrained encoder):  {metrics['knn_top1']:.2f}%")
    if "knn_top1_random_init" in metrics:
        lines.append(f"k-NN top-1 (random-init encoder): {metrics['knn_top1_random_init']:.2f}%")
    lines.append(f"MLflow UI: {redact_uri_credentials(run_url_hint(result.tracking_uri))}")
    lines.append(f"mlflow_run_id={result.run_id}")
    return lines
