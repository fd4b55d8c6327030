"""One optimizer step of the objective in its DeepSpeed engine (:func:`optimizer_step`), and what it reports.

Imports neither Ray, MLflow nor matplotlib: the GPU suite (``benchmarks/gpu``) and the peers' benchmarks run it
in a plain process on machines that lack them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from maskray.config import TrainConfig
from maskray.context import StepContext
from maskray.data import batch_size
from maskray.engine.fail_fast import failing_together
from maskray.objective import Objective


def to_device(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move the tensors of a (nested dict / list) batch to ``device``; floating ones take the compute dtype."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {key: to_device(value, device, dtype) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device, dtype) for value in batch)
    return batch


@dataclass
class StepRecord:
    """What one optimizer step produced: the mean loss over its micro-batches, the images it saw, samples the
    loader skipped, batches dropped for a non-finite loss, seconds waiting for data, and the mean of each
    metric."""

    loss: float
    images: int
    skipped: int
    bad: int
    wait: float
    metrics: dict[str, float] = field(default_factory=dict)


class NonFiniteLoss(RuntimeError):
    """``train.max_bad_batches`` consecutive batches had a non-finite loss (raised on every rank at once)."""


def finite_on_all_ranks(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank (collective: one all-reduce, so all ranks take the same branch)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


def optimizer_step(
    engine, objective: Objective, batches: Iterator[dict], ctx: StepContext, accum: int, device, dtype,
    max_bad: int = TrainConfig.model_fields["max_bad_batches"].default,
) -> StepRecord:
    """``accum`` micro-batches (DeepSpeed steps the optimizer at the last), then the objective's after-step hook
    (EMA teachers: once per optimizer step, never per micro-batch).

    A micro-batch whose loss is non-finite on any rank is dropped on every rank before its backward and the
    next batch takes its place, so DeepSpeed's engine (gradients, micro-step and step counters, LR schedule)
    never sees it; ``max_bad`` consecutive dropped batches raise :class:`NonFiniteLoss`."""
    wait = loss_sum = 0.0
    images = skipped = bad = 0
    metrics: dict[str, float] = defaultdict(float)
    for micro in range(accum):
        ctx.micro_step = micro
        in_a_row = 0
        while True:
            start = time.perf_counter()
            with failing_together(device):  # a data error on one rank stops every rank before the forward
                batch = next(batches)
            wait += time.perf_counter() - start
            skipped += int(batch.get("skipped", 0))
            out = engine(to_device(batch, device, dtype), ctx)
            if finite_on_all_ranks(out.loss):
                break
            bad += 1  # no backward: its graph goes with ``out`` at the next forward
            in_a_row += 1
            if in_a_row == max_bad:
                raise NonFiniteLoss(f"train.max_bad_batches: {max_bad} consecutive batches had a non-finite loss "
                                    f"at step {ctx.step + 1}")
        images += batch_size(batch)
        engine.backward(out.loss)
        engine.step()
        loss_sum += out.loss.detach().float().item()
        for key, value in out.metrics.items():
            metrics[key] += float(value) / accum
    metrics.update(objective.after_optimizer_step(ctx))
    return StepRecord(loss_sum / accum, images, skipped, bad, wait, dict(metrics))
