"""Masking: index generation (random, block-wise), patchify, and the fused-kernel seam (:mod:`.ops`)."""

from maskray.masking.block import block_mask
from maskray.masking.indices import MaskIndices, num_visible
from maskray.masking.ops import (
    decoder_unshuffle,
    embed_visible_patches,
    masked_patch_loss,
    random_mask_indices,
)
from maskray.masking.patches import patchify, patchify_chw, unpatchify

__all__ = [
    "MaskIndices",
    "block_mask",
    "decoder_unshuffle",
    "embed_visible_patches",
    "masked_patch_loss",
    "num_visible",
    "patchify",
    "patchify_chw",
    "random_mask_indices",
    "unpatchify",
]
