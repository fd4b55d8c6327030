"""Public masking ops: one seam, dispatched by device.

Every model and objective calls these functions, never the implementations directly. Today each op runs
its PyTorch implementation from :mod:`maskray.masking.reference`; fused kernels plug in here by device.
Shapes and conventions are documented on the reference functions.
"""

from __future__ import annotations

import torch

from maskray.masking.indices import MaskIndices, mask_indices_reference
from maskray.masking.reference import (
    decoder_unshuffle_reference,
    embed_visible_patches_reference,
    masked_patch_loss_reference,
)


def random_mask_indices(noise: torch.Tensor, num_keep: int) -> MaskIndices:
    """Rank ``noise`` (B, L) per row; the ``num_keep`` smallest are kept. Equal to a stable argsort."""
    return mask_indices_reference(noise, num_keep)


def embed_visible_patches(
    images: torch.Tensor,
    ids_keep: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor | None,
) -> torch.Tensor:
    """(B, C, H, W) images -> (B, 1+K, D) tokens of the visible patches only (CLS first)."""
    return embed_visible_patches_reference(images, ids_keep, weight, bias, pos_embed, cls_token)


def decoder_unshuffle(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """(B, 1+K, Dd) visible decoder tokens -> (B, 1+L, Dd) full sequence in image order."""
    return decoder_unshuffle_reference(x, ids_restore, mask_token, pos_embed)


def masked_patch_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-patch MSE on removed patches (``mask`` 1) against (optionally normalised) pixel targets."""
    return masked_patch_loss_reference(pred, images, mask, patch_size, norm_pix, eps)
