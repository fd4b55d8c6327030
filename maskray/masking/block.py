"""BEiT block-wise masking (Bao et al. 2021; BEiT v2 and DTM use the same generator).

Blocks of random area and log-uniform aspect ratio are added until the masked count is reached; the
count is then forced to be exact, as in the current unilm/beit2 code.
"""

from __future__ import annotations

import math

import numpy as np


def block_mask(
    grid: tuple[int, int],
    num_masked: int,
    rng: np.random.Generator,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_attempts: int = 10,
) -> np.ndarray:
    """Return an int mask of shape ``grid`` (1 = masked) with exactly ``num_masked`` ones."""
    height, width = grid
    if not 0 <= num_masked <= height * width:
        raise ValueError(f"num_masked={num_masked} does not fit a {height}x{width} grid")
    max_block = num_masked if max_block is None else max_block
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    mask = np.zeros(grid, dtype=np.int64)
    count = 0
    while count < num_masked:
        remaining = num_masked - count
        added = 0
        for _ in range(max_attempts):
            area = rng.uniform(min(min_block, remaining), min(max_block, remaining))
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < height and 0 < w < width):
                continue
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            window = mask[top : top + h, left : left + w]
            new = int(h * w - window.sum())
            if 0 < new <= remaining:
                window[:] = 1
                added = new
                break
        if added == 0:
            break
        count += added
    flat = mask.reshape(-1)
    surplus = int(flat.sum()) - num_masked
    if surplus > 0:
        flat[rng.choice(np.flatnonzero(flat == 1), surplus, replace=False)] = 0
    elif surplus < 0:
        flat[rng.choice(np.flatnonzero(flat == 0), -surplus, replace=False)] = 1
    return flat.reshape(grid)
