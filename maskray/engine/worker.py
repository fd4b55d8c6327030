"""The per-worker training loop that Ray Train runs on every worker (``train_loop_per_worker``).

Each worker builds the encoder and objective, wraps them in a DeepSpeed engine, streams its split of the
shards, and runs ``train.steps`` optimizer steps. Every ``train.checkpoint_every`` steps all ranks save
their DeepSpeed shard and call ``ray.train.report`` with it. Rank 0 logs to the MLflow run that the driver
created and runs the k-NN evaluation (random init before the first step, pretrained at the end).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from maskray.config import Config
from maskray.data import ImageTransform, Views, infinite_batches, resolve_shards
from maskray.engine.checkpoint import encoder_from_state, load_checkpoint, save_checkpoint
from maskray.engine.deepspeed_setup import build_engine, encoder_state, use_bf16
from maskray.eval.protocol import encoder_knn_metrics, eval_shard_sets
from maskray.models import build_encoder
from maskray.objective import build_objective
from maskray.tracking import RunLogger
from maskray.tracking.figures import loss_curve_figure


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Move tensors to ``device``; floating tensors take the engine's compute dtype."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved


class WindowStats:
    """Sums over the steps since the last log line; all-reduced across ranks at log time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = self.steps = self.images = self.skipped = self.wait = self.busy = 0.0
        self.start = time.perf_counter()

    def add(self, loss: float, images: int, skipped: int, wait: float, busy: float) -> None:
        self.loss += loss
        self.steps += 1
        self.images += images
        self.skipped += skipped
        self.wait += wait
        self.busy += busy

    def reduce(self) -> dict[str, float]:
        """Collective: every rank calls it at the same step."""
        totals = torch.tensor(
            [self.loss, self.steps, self.images, self.skipped, self.wait, self.busy], dtype=torch.float64
        ).to(self.device)
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss, steps, images, skipped, wait, busy = totals.tolist()
        elapsed = time.perf_counter() - self.start
        return {
            "loss": loss / max(steps, 1.0),
            "images_per_s": images / max(elapsed, 1e-9),
            "data_wait_frac": wait / max(busy, 1e-9),
            "skipped_samples_window": skipped,
        }


def _next_batch(batches: Iterator[dict]) -> tuple[dict, float]:
    start = time.perf_counter()
    batch = next(batches)
    return batch, time.perf_counter() - start


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point run by Ray Train on every worker. ``loop_config`` is built by the driver."""
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

    torch.manual_seed(config.train.seed)
    encoder = build_encoder(config.model)
    objective = build_objective(config.objective.name, config.objective.params, encoder)
    initial_weights = encoder.timm_state_dict() if rank == 0 else None
    bf16 = use_bf16(config, device)
    engine = build_engine(objective, config, world, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            start, run_id = load_checkpoint(engine, directory)
    logger = RunLogger(loop_config["tracking_uri"], run_id) if rank == 0 else None
    eval_sets = eval_shard_sets(config.eval) if rank == 0 else None

    if logger and eval_sets and start == 0 and config.eval.random_init:
        baseline = encoder_from_state(config, initial_weights).to(device)
        metrics = encoder_knn_metrics(baseline, eval_sets, config, device)
        logger.log_metrics({f"{key}_random_init": value for key, value in metrics.items()}, 0)
        del baseline
    del initial_weights

    shards = resolve_shards(config.data.shards)
    transform = Views(image=ImageTransform.for_training(config.model, config.data))
    batches = infinite_batches(
        shards, transform, batch_size=config.data.batch_size, rank=rank, world_size=world,
        num_workers=config.data.num_workers, resampled=config.data.resampled,
        shuffle_buffer=config.data.shuffle_buffer, seed=config.train.seed * 1_000_003 + start,
        multiprocessing_context="forkserver" if config.data.num_workers > 0 else None,
    )
    stats = WindowStats(device)
    skipped_total = 0.0
    accum = config.optim.grad_accum
    for step in range(start, last_step):
        step_start = time.perf_counter()
        wait = loss_sum = 0.0
        skipped = images = 0
        for _ in range(accum):
            batch, waited = _next_batch(batches)
            wait += waited
            skipped += int(batch.get("skipped", 0))
            images += batch["image"].shape[0]
            out = engine(to_device(batch, device, dtype), step)
            engine.backward(out.loss)
            engine.step()
            loss_sum += out.loss.detach().float().item()
        objective.after_optimizer_step(step)
        stats.add(loss_sum / accum, images, skipped, wait, time.perf_counter() - step_start)
        done = step + 1
        if done % config.train.log_every == 0 or done == last_step:
            window = stats.reduce()
            skipped_total += window.pop("skipped_samples_window")
            if logger:
                lr = engine.get_lr()[0]
                logger.log_metrics({**window, "lr": lr, "skipped_samples": skipped_total}, done)
                # the raw stream: Ray Train's patched print would tee this line twice
                print(f"[rank 0] step {done}/{config.train.steps} loss {window['loss']:.4f} "
                      f"lr {lr:.2e} {window['images_per_s']:.0f} img/s", file=sys.__stdout__, flush=True)
            stats.reset()
        if done % config.train.checkpoint_every == 0 or done == last_step:
            weights = encoder_state(engine, objective)
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(engine, directory, done, run_id, weights if rank == 0 else None, config)
                if dist.is_initialized():
                    dist.barrier()
                ray.train.report({"step": done}, checkpoint=Checkpoint.from_directory(directory))

    if start >= last_step:
        return
    if logger:
        if eval_sets:  # the last step always checkpoints, so ``weights`` holds the final encoder
            trained = encoder_from_state(config, weights).to(device)
            logger.log_metrics(encoder_knn_metrics(trained, eval_sets, config, device), last_step)
        logger.log_figure(loss_curve_figure(logger), "loss_curve.png")
        if engine.zero_optimization_stage() < 3:  # rank 0 holds every parameter
            for filename, figure in objective.figures(to_device(batch, device, dtype)).items():
                logger.log_figure(figure, filename)
    if dist.is_initialized():
        dist.barrier()
