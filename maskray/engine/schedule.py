"""Learning-rate schedule: linear warmup, then half-cycle cosine to ``min_lr`` (MAE's ``lr_sched``)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based), a pure function so resume is exact."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
