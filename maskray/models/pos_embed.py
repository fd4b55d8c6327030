"""Fixed 2-D sine-cosine position embeddings (MAE / MoCo v3 convention)."""

from __future__ import annotations

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions: (M,) -> (M, dim): half sine, half cosine at geometric frequencies."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_slot: bool = True) -> torch.Tensor:
    """Return a (1, [1+] gh*gw, dim) float32 table; rows in row-major patch order; CLS slot is zeros.

    The first half of the channels encodes the column (x) and the second half the row (y), as in MAE.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    table = torch.cat([_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    if cls_slot:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)
