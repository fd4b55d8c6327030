"""Fused Triton kernels for the masking ops (one module per op, each an autograd Function).

Imported lazily by :mod:`maskray.masking.ops` on the first call that dispatches to Triton (CUDA tensors, or CPU
tensors with ``MASKRAY_TRITON_INTERPRET=1`` and ``TRITON_INTERPRET=1``), never by ``import maskray``. Whether
the kernels are interpreted is fixed when this package is first imported (see ``_common.INTERPRET``).
"""

from maskray.masking.triton._common import INTERPRET, cuda_tuning_enabled
from maskray.masking.triton.embed import embed_visible_patches, gather_patches
from maskray.masking.triton.indices import random_mask_indices
from maskray.masking.triton.loss import masked_patch_loss
from maskray.masking.triton.unshuffle import decoder_unshuffle

__all__ = [
    "INTERPRET",
    "cuda_tuning_enabled",
    "decoder_unshuffle",
    "embed_visible_patches",
    "gather_patches",
    "masked_patch_loss",
    "random_mask_indices",
]
