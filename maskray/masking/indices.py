"""Per-sample random masking by ranking noise (MAE, He et al. 2021, section 3).

Conventions used by every masking function in maskray:
- ``ids_keep``: (B, K) int64, patch indices kept visible, in the shuffled order (kept first).
- ``ids_restore``: (B, L) int64, inverse permutation: ``shuffled[ids_restore]`` is image order.
- ``mask``: (B, L) float, 1 = removed (the encoder never sees it), 0 = visible, in image order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patch count ``int(L * (1 - r))``, truncated as in the MAE reference."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1.0 - mask_ratio))


@dataclass(frozen=True)
class MaskIndices:
    """Result of random masking; shapes in the module docstring."""

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[1]


def mask_indices_reference(noise: torch.Tensor, num_keep: int) -> MaskIndices:
    """PyTorch definition of random masking: a stable argsort of ``noise`` (B, L), smallest kept.

    This is the oracle for the fused kernel and the CPU implementation.
    """
    batch, length = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones(batch, length, device=noise.device, dtype=torch.float32)
    mask[:, :num_keep] = 0.0
    mask = torch.gather(mask, 1, ids_restore)
    return MaskIndices(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)
