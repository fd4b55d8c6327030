"""Patchify / unpatchify in the MAE pixel-target order.

A patch vector is laid out (p, q, c): row in patch, column in patch, channel fastest. This is the order of
MAE's ``patchify`` and of every pixel-target objective in maskray. The patch *embedding* weights keep timm's
Conv2d layout (D, C, p, p), i.e. (c, p, q) order; :func:`patchify_chw` gives vectors in that order.
"""

from __future__ import annotations

import torch


def _grid(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch size {patch_size}")
    return height // patch_size, width // patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images: (B, C, H, W) -> (B, L, p*p*C) with L = (H/p)*(W/p), vectors in (p, q, c) order."""
    batch, channels = images.shape[:2]
    gh, gw = _grid(images, patch_size)
    x = images.reshape(batch, channels, gh, patch_size, gw, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1)
    return x.reshape(batch, gh * gw, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, H, W)."""
    batch = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(batch, gh, gw, patch_size, patch_size, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)
    return x.reshape(batch, channels, gh * patch_size, gw * patch_size)


def patchify_chw(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images: (B, C, H, W) -> (B, L, C*p*p), vectors in the Conv2d weight order (c, p, q)."""
    batch, channels = images.shape[:2]
    gh, gw = _grid(images, patch_size)
    x = images.reshape(batch, channels, gh, patch_size, gw, patch_size)
    x = x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(batch, gh * gw, channels * patch_size * patch_size)
