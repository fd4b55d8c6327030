"""The per-worker training loop that Ray Train runs on every worker (``train_loop_per_worker``).

Each worker builds the encoder (same weights on every rank: seeded with ``train.seed``, then ``model.init_from``'s
weights when set) and the objective, then seeds its own generators from (seed, rank), wraps the objective in a
DeepSpeed engine, moves the objective's teachers to the device, streams its split of the shards through the
objective's own input transform, and runs ``train.steps`` optimizer steps. After each optimizer step the objective's
EMA teachers are updated. Every ``train.checkpoint_every`` steps all ranks save their training state and call
``ray.train.report`` with it. A batch whose loss is non-finite on any rank is dropped on all of them (counted in
``bad_batches``; ``train.max_bad_batches`` in a row stop the run, its last checkpoint kept), and a SIGTERM to the
driver or a worker checkpoints at the next step (:mod:`maskray.engine.stopping`). Rank 0 logs to the MLflow run
that the driver created (every objective metric averaged over ranks; held until the next checkpoint, so that a
restart never logs a step twice: :mod:`maskray.engine.metric_log`) and runs the k-NN evaluation: the initial
encoder before the first step, logged as ``*_random_init`` (with ``model.init_from``, the released weights), the
trained one every ``eval.every`` steps and at the end. At the end rank 0 also logs the final evaluation encoder as
the run's artifact ``encoder/encoder.safetensors`` (the export format, :mod:`maskray.weights`), which outlives the
rotated checkpoints (a frozen teacher's ``run_id`` source), and the objective's kept artifacts
(:meth:`~maskray.objective.Objective.export_artifacts`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from maskray.checkpoint import encoder_from_state
from maskray.config import Config
from maskray.context import RankRandomness, StepContext
from maskray.data import infinite_batches, resolve_shards
from maskray.data.health import DataHealth, stop_note_location
from maskray.data.transforms import channel_stats
from maskray.distributed import gathered
from maskray.engine.deepspeed_setup import build_engine, encoder_state, use_bf16
from maskray.engine.metric_log import HeldMetrics
from maskray.engine.step import NonFiniteLoss, StepRecord, optimizer_step, to_device
from maskray.engine.stopping import DRIVER_REQUEST, StopSignal, WorkerTerminated, install_worker_sigterm
from maskray.engine.training_state import load_training_state, save_training_state
from maskray.eval.protocol import encoder_knn_metrics, eval_shard_sets
from maskray.models import MaskedViT, build_encoder, load_pretrained
from maskray.objective import build_objective
from maskray.tracking import RunLogger
from maskray.tracking.figures import loss_curve_figure
from maskray.weights import ARTIFACT_DIR, RUN_ARTIFACT, weights_metadata


class WindowStats:
    """Sums over the steps since the last log line; all-reduced across ranks at log time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = self.steps = self.images = self.skipped = self.bad = self.wait = self.busy = 0.0
        self.metrics: dict[str, float] = defaultdict(float)
        self.start = time.perf_counter()

    def add(self, record: StepRecord, busy: float) -> None:
        self.loss += record.loss
        self.steps += 1
        self.images += record.images
        self.skipped += record.skipped
        self.bad += record.bad
        self.wait += record.wait
        self.busy += busy
        for key, value in record.metrics.items():
            self.metrics[key] += value

    def reduce(self) -> dict[str, float]:
        """Collective: every rank calls it at the same step (with the same metric names)."""
        names = sorted(self.metrics)
        totals = torch.tensor(
            [self.loss, self.steps, self.images, self.skipped, self.bad, self.wait, self.busy,
             *(self.metrics[n] for n in names)],
            dtype=torch.float64,
        ).to(self.device)
        world = 1
        if dist.is_initialized():
            dist.all_reduce(totals)
            world = dist.get_world_size()
        values = totals.tolist()
        loss, steps, images, skipped, bad, wait, busy = values[:7]
        elapsed = time.perf_counter() - self.start
        return {
            "loss": loss / max(steps, 1.0),
            "images_per_s": images / max(elapsed, 1e-9),
            "data_wait_frac": wait / max(busy, 1e-9),
            "skipped_samples_window": skipped,
            "bad_batches_window": bad / world,  # every rank drops the same batches
            **{name: value / max(steps, 1.0) for name, value in zip(names, values[7:], strict=True)},
        }


def log_final_encoder(
    logger: RunLogger, encoder: MaskedViT, weights: dict[str, torch.Tensor], config: Config, step: int
) -> None:
    """Log ``weights`` (the evaluation encoder's timm state dict, of ``encoder``'s architecture) as the run's
    artifact ``encoder/encoder.safetensors`` with the export metadata (arch, kwargs, step, the data's mean / std)."""
    mean, std = channel_stats(config.data.mean, config.data.std, config.model.in_chans)
    metadata = weights_metadata(encoder, f"mlflow run {logger.run_id}", step, mean, std)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, os.path.basename(RUN_ARTIFACT))
        save_file({key: value.contiguous() for key, value in weights.items()}, path, metadata=metadata)
        logger.log_file(path, ARTIFACT_DIR)


def train_loop_per_worker(loop_config: dict) -> str | None:
    """Entry point run by Ray Train on every worker. ``loop_config`` is built by the driver. Returns why the run
    stopped before its last step (the driver's SIGTERM, non-finite losses), None when it did not."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint is enough: ours
    config = Config.model_validate(loop_config["config"])
    run_id: str = loop_config["mlflow_run_id"]
    last_step = min(config.train.steps, loop_config.get("max_steps") or config.train.steps)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    checkpoint = ray.train.get_checkpoint()
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    encoder = build_encoder(config.model)
    if config.model.init_from and not checkpoint:  # before the objective: its EMA teachers copy the encoder
        load_pretrained(encoder, config.model.init_from)
    objective = build_objective(config.objective.name, config.objective.params, encoder)
    initial_weights = encoder.timm_state_dict() if rank == 0 else None
    randomness = RankRandomness(config.train.seed, rank, device)
    bf16 = use_bf16(config, device)
    engine = build_engine(objective, config, world, bf16)
    for teacher in objective.teachers().values():
        teacher.to(device)
    dtype = torch.bfloat16 if bf16 else torch.float32

    start = 0
    if checkpoint:
        with checkpoint.as_directory() as directory:
            start, run_id = load_training_state(engine, objective, randomness, directory, rank)
    logger = RunLogger(loop_config["tracking_uri"], run_id) if rank == 0 else None
    held = HeldMetrics(logger) if logger else None
    eval_sets = eval_shard_sets(config.eval) if rank == 0 else None
    install_worker_sigterm()
    stop = StopSignal(loop_config.get("stop_request"), rank, device)

    if held and eval_sets and start == 0 and config.eval.random_init:
        baseline = encoder_from_state(config, initial_weights).to(device)
        metrics = encoder_knn_metrics(baseline, eval_sets, config, device)
        held.add({f"{key}_random_init": value for key, value in metrics.items()}, 0)
        del baseline
    del initial_weights

    shards = resolve_shards(config.data.shards)
    health = DataHealth(config.data.max_bad_fraction, rank, device,
                        stop_note_location(config.tracking.storage_path, context.get_experiment_name()))
    batches = health.watch(infinite_batches(
        shards, objective.inputs(config.model, config.data), batch_size=config.data.batch_size, rank=rank,
        world_size=world, num_workers=config.data.num_workers, resampled=config.data.resampled,
        shuffle_buffer=config.data.shuffle_buffer, seed=config.train.seed * 1_000_003 + start,
        multiprocessing_context="forkserver" if config.data.num_workers > 0 else None,
        verify=config.data.verify_sha256,
    ))
    stats = WindowStats(device)
    skipped_total = bad_total = 0.0
    done = start
    for step in range(start, last_step):
        step_start = time.perf_counter()
        ctx = StepContext(step, config.train.steps, rank, world, seed=config.train.seed, generator=randomness.generator)
        try:
            record = optimizer_step(engine, objective, batches, ctx, config.optim.grad_accum, device, dtype,
                                    config.train.max_bad_batches)
        except NonFiniteLoss as stopped:  # on every rank at once; the last checkpoint stays the latest
            return f"{stopped}; the latest checkpoint is the last good one"
        stats.add(record, time.perf_counter() - step_start)
        done = step + 1
        stopping = stop.poll() if done < last_step else None  # collective: the same condition on every rank
        if done % config.train.log_every == 0 or done == last_step or stopping:
            window = stats.reduce()
            skipped_total += window.pop("skipped_samples_window")
            bad_total += window.pop("bad_batches_window")
            if held:
                lr = engine.get_lr()[0]
                held.add({**window, "lr": lr, "skipped_samples": skipped_total, "bad_batches": bad_total}, done)
                # the raw stream: Ray Train's patched print would tee this line twice
                print(f"[rank 0] step {done}/{config.train.steps} loss {window['loss']:.4f} "
                      f"lr {lr:.2e} {window['images_per_s']:.0f} img/s", file=sys.__stdout__, flush=True)
            stats.reset()
            if health.check(logger):  # too much data lost: every rank stops here, the driver raises the reason
                if held:
                    held.flush()
                return None
        knn_now = config.eval.knn_enabled and config.eval.every and done % config.eval.every == 0 and done < last_step
        checkpoint_now = done % config.train.checkpoint_every == 0 or done == last_step or stopping
        if knn_now or checkpoint_now:  # one gather serves both (a collective under ZeRO-3: every rank calls it)
            weights = encoder_state(objective)
        if knn_now and held:
            trained = encoder_from_state(config, weights).to(device)
            held.add(encoder_knn_metrics(trained, eval_sets, config, device), done)
        if checkpoint_now:
            with tempfile.TemporaryDirectory() as directory:
                save_training_state(engine, objective, randomness, directory, done, run_id, rank,
                                    weights if rank == 0 else None, config)
                if dist.is_initialized():
                    dist.barrier()
                ray.train.report({"step": done}, checkpoint=Checkpoint.from_directory(directory))
            # queued behind the checkpoint's report (Ray Train's result queue holds one): returns once the
            # controller has taken the checkpoint, so a restart from now on starts from it
            ray.train.report({"step": done})
            if held:
                held.flush()
        if stopping:
            print(f"[rank {rank}] {stopping}: checkpointed at step {done}", file=sys.__stdout__, flush=True)
            if stopping == DRIVER_REQUEST:
                return stopping
            raise WorkerTerminated(f"{stopping}: checkpointed at step {done}; Ray Train restarts the workers")

    if start >= last_step:  # restarted after the final checkpoint (the group died in the final stage) or re-submitted:
        weights = encoder_state(objective)  # the final stage again (its artifacts overwrite, its metrics dedupe)
    if logger:  # the last step always checkpoints, so ``weights`` holds the final encoder
        log_final_encoder(logger, encoder, weights, config, last_step)
        if eval_sets:
            trained = encoder_from_state(config, weights).to(device)
            held.add(encoder_knn_metrics(trained, eval_sets, config, device), last_step)
            held.flush()
        logger.log_figure(loss_curve_figure(logger), "loss_curve.png")
        if engine.zero_optimization_stage() < 3:  # rank 0 holds every parameter
            sample = to_device(next(batches), device, dtype)
            for filename, figure in objective.figures(sample).items():
                logger.log_figure(figure, filename)
    with tempfile.TemporaryDirectory() as directory, gathered(objective.parameters()):  # ZeRO-3: collective
        if logger:
            objective.export_artifacts(Path(directory), config)
            if any(Path(directory).iterdir()):
                logger.log_artifacts(directory)
    if dist.is_initialized():
        dist.barrier()
    return None
