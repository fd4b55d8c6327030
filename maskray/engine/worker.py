"""The per-worker training loop that Ray Train runs on every worker (``train_loop_per_worker``), in named stages.

:class:`WorkerRun` holds one rank's run and its stages, each a method that can be tested on its own:

- **set-up** (:meth:`WorkerRun.set_up`): the encoder (same weights on every rank: seeded with ``train.seed``,
  then ``model.init_from``'s weights when set) and the objective from the run specification's typed params (its
  frozen teachers checked against the sha256 the driver pinned), the loader transform and shards; then, after
  every rank agreed that none failed, this rank's generators, the DeepSpeed engine, the latest checkpoint, the
  MLflow logger (rank 0), the stop signal and the batch stream;
- **baseline** (:meth:`WorkerRun.baseline`): rank 0's k-NN of the initial encoder, logged as ``*_random_init``
  (with ``model.init_from``, the released weights);
- **step** (:func:`maskray.engine.step.optimizer_step`): ``optim.grad_accum`` micro-batches and the objective's
  after-step hook (EMA teachers); a batch whose loss is non-finite on any rank is dropped on all of them;
- **log window** (:meth:`WorkerRun.log_window`): every ``train.log_every`` steps the window's sums all-reduced,
  held for MLflow (every objective metric averaged over ranks; held until the next checkpoint, so that a restart
  never logs a step twice: :mod:`maskray.engine.metric_log`), and the data-health check;
- **checkpoint** (:meth:`WorkerRun.checkpoint`): every ``train.checkpoint_every`` steps, at the last step and
  on a stop request, all ranks save their training state and ``ray.train.report`` it; the trained encoder's
  k-NN every ``eval.every`` steps (:meth:`WorkerRun.evaluate`);
- **final stage** (:meth:`WorkerRun.final_stage`): rank 0 logs the final evaluation encoder as the run's artifact
  ``encoder/encoder.safetensors`` (the export format, :mod:`maskray.weights`; it outlives the rotated
  checkpoints), its k-NN, the loss curve, the objective's figures and kept artifacts.

A SIGTERM to the driver or a worker checkpoints at the next step (:mod:`maskray.engine.stopping`). A user error
(:class:`~maskray.errors.MaskrayError`) on any rank in any stage stops every rank together, and the function
returns it to the driver without a restart (:mod:`maskray.engine.fail_fast`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from maskray.checkpoint import encoder_from_state
from maskray.config import Config
from maskray.context import RankRandomness, StepContext
from maskray.data import infinite_batches, resolve_shards
from maskray.data.health import DataHealth, stop_note_location
from maskray.data.reader import LoaderOptions
from maskray.data.transforms import channel_stats
from maskray.distributed import gathered
from maskray.engine.deepspeed_setup import build_engine, encoder_state, use_bf16
from maskray.engine.fail_fast import RunFailed, failing_together
from maskray.engine.metric_log import HeldMetrics
from maskray.engine.step import NonFiniteLoss, StepRecord, optimizer_step, to_device
from maskray.engine.stopping import DRIVER_REQUEST, StopSignal, WorkerTerminated, install_worker_sigterm
from maskray.engine.training_state import load_training_state, save_training_state
from maskray.errors import MaskrayError
from maskray.eval.protocol import encoder_knn_metrics, eval_shard_sets
from maskray.models import MaskedViT, build_encoder, load_pretrained
from maskray.objective import build_objective
from maskray.run_spec import RunSpec
from maskray.weights import ARTIFACT_DIR, RUN_ARTIFACT, weights_metadata

if TYPE_CHECKING:  # rank 0 imports MLflow and matplotlib when it logs; the other ranks never do (~1.5 CPU-s)
    from maskray.tracking import RunLogger


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



LOST_DATA = "data.max_bad_fraction"  # why train() stopped when too much data was lost (the note says more)


class WorkerRun:
    """One rank's training run (see the module docstring for its stages). Build it with :meth:`set_up`, which
    sets its parts: ``encoder``, ``objective``, ``transform``, ``shards``, ``eval_sets`` (rank 0's k-NN shard
    sets, None elsewhere or when k-NN is off), ``randomness``, ``engine``, ``dtype``, ``start`` (the step to
    resume at), ``run_id``, ``logger`` / ``held`` (rank 0's MLflow logger and held metrics), ``stop``, ``health``,
    ``batches`` and the log window's ``stats``."""

    def __init__(self, spec: RunSpec, rank: int, world: int, device: torch.device, last_step: int) -> None:
        self.spec, self.config = spec, spec.config
        self.rank, self.world, self.device, self.last_step = rank, world, device, last_step

    @classmethod
    def set_up(cls, spec: RunSpec, loop_config: dict, context, checkpoint) -> WorkerRun:
        """The set-up stage (collective): ``context`` is Ray Train's worker context, ``checkpoint`` the one to
        resume from (or None)."""
        config = spec.config
        last_step = min(config.train.steps, loop_config.get("max_steps") or config.train.steps)
        run = cls(spec, context.get_world_rank(), context.get_world_size(), loop_config["device"], last_step)
        with failing_together(run.device):  # nothing collective in here: a rank that fails still reaches agree()
            torch.manual_seed(config.train.seed)  # identical initial weights on every rank
            run.encoder = build_encoder(config.model)
            if config.model.init_from and not checkpoint:  # before the objective: its EMA teachers copy it
                load_pretrained(run.encoder, config.model.init_from)
            run.objective = build_objective(config.objective.name, spec.objective, run.encoder)
            run.transform = run.objective.inputs(config.model, config.data)
            run.shards = resolve_shards(config.data.shards)
            run.eval_sets = eval_shard_sets(config.eval) if run.rank == 0 else None  # rank 0 evaluates
        run.initial_weights = run.encoder.timm_state_dict() if run.rank == 0 else None
        run.randomness = RankRandomness(config.train.seed, run.rank, run.device)
        bf16 = use_bf16(config, run.device)
        run.engine = build_engine(run.objective, config, run.world, bf16)
        for teacher in run.objective.teachers().values():
            teacher.to(run.device)
        run.dtype = torch.bfloat16 if bf16 else torch.float32
        run.start, run.run_id = 0, loop_config["mlflow_run_id"]
        if checkpoint:
            with checkpoint.as_directory() as directory:
                run.start, run.run_id = load_training_state(run.engine, run.objective, run.randomness, directory,
                                                            run.rank)
        if run.rank == 0:
            from maskray.tracking import RunLogger

            run.logger = RunLogger(loop_config["tracking_uri"], run.run_id)
        else:
            run.logger = None
        run.held = HeldMetrics(run.logger) if run.logger else None
        install_worker_sigterm()
        run.stop = StopSignal(loop_config.get("stop_request"), run.rank, run.device)
        run.health = DataHealth(config.data.max_bad_fraction, run.rank, run.device,
                                stop_note_location(config.tracking.storage_path, context.get_experiment_name()))
        run.batches = run.health.watch(infinite_batches(
            run.shards, run.transform, LoaderOptions.of(config.data), rank=run.rank, world_size=run.world,
            seed=config.train.seed * 1_000_003 + run.start,
        ))
        run.stats = WindowStats(run.device)
        run.skipped_total = run.bad_total = 0.0
        return run

    def baseline(self) -> None:
        """Rank 0: the k-NN of the initial encoder, once per run (not after a resume)."""
        with failing_together(self.device):
            if self.held and self.eval_sets and self.start == 0 and self.config.eval.random_init:
                baseline = encoder_from_state(self.config, self.initial_weights).to(self.device)
                metrics = encoder_knn_metrics(baseline, self.eval_sets, self.config, self.device)
                self.held.add({f"{key}_random_init": value for key, value in metrics.items()}, 0)
        self.initial_weights = None

    def log_window(self, done: int) -> bool:
        """Collective: reduce and hold the window's metrics at step ``done``, print rank 0's line, check the data's
        health. True when too much data was lost (every rank stops; the driver raises the reason)."""
        window = self.stats.reduce()
        self.skipped_total += window.pop("skipped_samples_window")
        self.bad_total += window.pop("bad_batches_window")
        if self.held:
            lr = self.engine.get_lr()[0]
            self.held.add({**window, "lr": lr, "skipped_samples": self.skipped_total,
                           "bad_batches": self.bad_total}, done)
            # the raw stream: Ray Train's patched print would tee this line twice
            print(f"[rank 0] step {done}/{self.config.train.steps} loss {window['loss']:.4f} "
                  f"lr {lr:.2e} {window['images_per_s']:.0f} img/s", file=sys.__stdout__, flush=True)
        self.stats.reset()
        if self.health.check(self.logger):
            if self.held:
                self.held.flush()
            return True
        return False


    def evaluate(self, weights: dict[str, torch.Tensor], step: int) -> None:
        """Rank 0: the k-NN of the encoder ``weights`` (its timm state dict), held for step ``step``."""
        with failing_together(self.device):
            if self.held and self.eval_sets:
                trained = encoder_from_state(self.config, weights).to(self.device)
                self.held.add(encoder_knn_metrics(trained, self.eval_sets, self.config, self.device), step)

    def checkpoint(self, weights: dict[str, torch.Tensor], done: int) -> None:
        """Collective: every rank saves its training state for step ``done`` and reports it to Ray Train; the held
        metrics are flushed once the controller has taken it."""
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as directory:
            save_training_state(self.engine, self.objective, self.randomness, directory, done, self.run_id,
                                self.rank, weights if self.rank == 0 else None, self.config)
            if dist.is_initialized():
                dist.barrier()
            ray.train.report({"step": done}, checkpoint=Checkpoint.from_directory(directory))
        # queued behind the checkpoint's report (Ray Train's result queue holds one): returns once the controller
        # has taken the checkpoint, so a restart from now on starts from it
        ray.train.report({"step": done})
        if self.held:
            self.held.flush()

    def train(self) -> str | None:
        """The steps from the resumed one to the last, with their log windows, evaluations and checkpoints.
        Returns why the run stopped early (the driver's SIGTERM, non-finite losses, :data:`LOST_DATA`), None if it
        did not."""
        config = self.config
        for step in range(self.start, self.last_step):
            step_start = time.perf_counter()
            ctx = StepContext(step, config.train.steps, self.rank, self.world, seed=config.train.seed,
                              generator=self.randomness.generator)
            try:
                record = optimizer_step(self.engine, self.objective, self.batches, ctx, config.optim.grad_accum,
                                        self.device, self.dtype, config.train.max_bad_batches)
            except NonFiniteLoss as stopped:  # on every rank at once; the last checkpoint stays the latest
                return f"{stopped}; the latest checkpoint is the last good one"
            self.stats.add(record, time.perf_counter() - step_start)
            done = step + 1
            stopping = self.stop.poll() if done < self.last_step else None  # collective: the same on every rank
            if done % config.train.log_every == 0 or done == self.last_step or stopping:
                if self.log_window(done):
                    return LOST_DATA
            evaluate_now = (config.eval.knn_enabled and config.eval.every and done % config.eval.every == 0
                            and done < self.last_step)
            checkpoint_now = done % config.train.checkpoint_every == 0 or done == self.last_step or stopping
            if evaluate_now or checkpoint_now:  # one gather serves both (a collective under ZeRO-3)
                weights = encoder_state(self.objective)
                if evaluate_now:
                    self.evaluate(weights, done)
                if checkpoint_now:
                    self.checkpoint(weights, done)
            if stopping:
                print(f"[rank {self.rank}] {stopping}: checkpointed at step {done}", file=sys.__stdout__, flush=True)
                if stopping == DRIVER_REQUEST:
                    return stopping
                raise WorkerTerminated(f"{stopping}: checkpointed at step {done}; Ray Train restarts the workers")
        return None

    def final_stage(self) -> None:
        """After the last step (again after a restart past it: its artifacts overwrite, its metrics dedupe): rank 0
        logs the final encoder, its k-NN, the loss curve, the objective's figures and artifacts. Collective."""
        weights = encoder_state(self.objective)  # a collective under ZeRO-3: every rank gathers
        if self.logger:
            log_final_encoder(self.logger, self.encoder, weights, self.config, self.last_step)
        self.evaluate(weights, self.last_step)
        with failing_together(self.device):
            if self.logger:
                self.held.flush()
                from maskray.tracking.figures import loss_curve_figure

                self.logger.log_figure(loss_curve_figure(self.logger), "loss_curve.png")
                if self.engine.zero_optimization_stage() < 3:  # rank 0 holds every parameter
                    sample = to_device(next(self.batches), self.device, self.dtype)
                    for filename, figure in self.objective.figures(sample).items():
                        self.logger.log_figure(figure, filename)
        with tempfile.TemporaryDirectory() as directory, gathered(self.objective.parameters()):  # ZeRO-3: collective
            if self.logger:
                self.objective.export_artifacts(Path(directory), self.config)
                if any(Path(directory).iterdir()):
                    self.logger.log_artifacts(directory)
        if dist.is_initialized():
            dist.barrier()


def train_loop_per_worker(loop_config: dict) -> str | MaskrayError | None:
    """Entry point run by Ray Train on every worker. ``loop_config`` is built by the driver: the run
    specification (``spec``, by object reference), the MLflow run id and store, ``max_steps``, the stop request's
    name. Returns why the run stopped before its last step (the driver's SIGTERM, non-finite losses), the user error
    that stopped every rank (:mod:`maskray.engine.fail_fast`), or None."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import ray
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint is enough: ours
    loop_config = {**loop_config, "device": ray.train.torch.get_device()}
    try:
        spec = ray.get(loop_config["spec"])
        run = WorkerRun.set_up(spec, loop_config, ray.train.get_context(), ray.train.get_checkpoint())
        run.baseline()
        stopped = run.train()
        if stopped is None:
            run.final_stage()
        return None if stopped == LOST_DATA else stopped  # lost data: the driver raises the workers' note
    except RunFailed as failed:  # on every rank at once: no restart, the driver exits 2 with the error's line
        return failed.error
