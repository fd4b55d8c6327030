"""Schedules as pure functions of the optimizer step (so gradient accumulation and resume are exact).

- :func:`warmup_cosine`: the learning rate, linear warmup then half-cycle cosine to ``min_lr`` (MAE's ``lr_sched``);
- :func:`cosine_schedule` and :func:`linear_schedule`: values such as an EMA teacher's momentum (spec
  ``objectives.md`` section 1.6: cosine 0.996 -> 1 for LUT and MoCo v3, linear 0.996 -> 1 over 1.25x the steps
  for MSN). Arguments are validated with errors that name the value (lightly's ``cosine_schedule`` does the same).
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based), a pure function so resume is exact."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check(step: int, total_steps: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """``end - (end - start) * (1 + cos(pi * step / (total_steps - 1))) / 2``: ``start`` at step 0, ``end`` at the
    last step ``total_steps - 1`` and after it (one step: ``end``)."""
    _check(step, total_steps)
    if total_steps == 1:
        return end
    progress = min(1.0, step / (total_steps - 1))
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """``start + (end - start) * step / total_steps``, held at ``end`` from ``total_steps`` on."""
    _check(step, total_steps)
    return start + (end - start) * min(1.0, step / total_steps)
