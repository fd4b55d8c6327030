"""Public masking ops: one seam, dispatched by device.

Every model and objective calls these functions, never the implementations directly. Shapes and conventions are
documented on the reference functions in :mod:`maskray.masking.reference`.

Dispatch: CUDA tensors run the fused Triton kernels of :mod:`maskray.masking.triton` (imported lazily, on the
first such call); CPU tensors run the PyTorch reference, except when both ``MASKRAY_TRITON_INTERPRET=1`` and
``TRITON_INTERPRET=1`` are set (tests), in which case they run the same Triton kernels in Triton's interpreter.
A CPU tensor never reaches a compiled Triton launch: if the kernel package was imported without the interpreter,
CPU calls fall back to the reference. If Triton cannot be imported, everything runs the reference.

On a GPU where an op's kernel lost to ``torch.compile`` of its reference (the GPU suite's masking step,
``benchmarks/gpu/run.sh``), that op runs the compiled reference instead: :data:`COMPILED_REFERENCE` lists such ops
by GPU name, and ``MASKRAY_MASKING_COMPILED`` (a comma list of op names, or ``none``) overrides it.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from maskray.masking.indices import MaskIndices, mask_indices_reference
from maskray.masking.reference import (
    decoder_unshuffle_reference,
    embed_visible_patches_reference,
    masked_patch_loss_reference,
)

_BACKEND: ModuleType | None = None
_BACKEND_FAILED = False

# GPU name substring -> the ops (this module's function names) whose Triton kernel was slower there than
# ``torch.compile`` of the reference, measured by the GPU suite's masking step (BENCHMARKS.md, "GPU suite"). Empty
# until a GPU has measured them: every op runs its kernel on CUDA.
COMPILED_REFERENCE: dict[str, frozenset[str]] = {}
COMPILED_ENV = "MASKRAY_MASKING_COMPILED"
_COMPILED: dict[str, Callable] = {}


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def prefers_compiled_reference(op: str, tensor: torch.Tensor) -> bool:
    """Whether ``op`` on ``tensor``'s device runs ``torch.compile`` of the reference rather than its kernel: CUDA
    only, per ``MASKRAY_MASKING_COMPILED`` when set, else per :data:`COMPILED_REFERENCE`."""
    if tensor.device.type != "cuda":
        return False
    forced = os.environ.get(COMPILED_ENV)
    if forced is not None:
        return op in {name.strip() for name in forced.split(",")}
    name = _device_name(tensor.device.index or 0)
    return any(key in name and op in names for key, names in COMPILED_REFERENCE.items())


def _compiled(op: str, reference: Callable) -> Callable:
    """``torch.compile`` of ``reference``, once per op (shapes recompile as torch decides)."""
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(reference)
    return _COMPILED[op]


def interpret_requested() -> bool:
    """True when CPU tensors should go through the Triton interpreter (both env vars set to 1)."""
    return os.environ.get("MASKRAY_TRITON_INTERPRET") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def _backend() -> ModuleType | None:
    """The lazily imported kernel package, or None if Triton is unusable here."""
    global _BACKEND, _BACKEND_FAILED
    if _BACKEND is None and not _BACKEND_FAILED:
        try:
            import maskray.masking.triton as backend
        except ImportError as err:  # triton missing: the reference serves every device
            warnings.warn(f"maskray: Triton kernels unavailable ({err}); using the PyTorch reference", stacklevel=3)
            _BACKEND_FAILED = True
        else:
            _BACKEND = backend
    return _BACKEND


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on these tensors runs the Triton kernels (see the module docstring)."""
    kinds = {t.device.type for t in tensors if t is not None}
    if kinds == {"cuda"}:
        return _backend() is not None
    if kinds == {"cpu"} and interpret_requested():
        backend = _backend()
        if backend is None:
            return False
        if not backend.INTERPRET:
            warnings.warn(
                "maskray: kernels were imported without TRITON_INTERPRET=1; CPU tensors use the reference",
                stacklevel=3,
            )
            return False
        return True
    return False


def random_mask_indices(noise: torch.Tensor, num_keep: int) -> MaskIndices:
    """Rank ``noise`` (B, L) per row; the ``num_keep`` smallest are kept. Equal to a stable argsort."""
    if prefers_compiled_reference("random_mask_indices", noise):
        return _compiled("random_mask_indices", mask_indices_reference)(noise, num_keep)
    if use_triton(noise):
        return _backend().random_mask_indices(noise, num_keep)
    return mask_indices_reference(noise, num_keep)


def embed_visible_patches(
    images: torch.Tensor,
    ids_keep: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor | None,
    *,
    mean=None,
    std=None,
) -> torch.Tensor:
    """(B, C, H, W) images -> (B, 1+K, D) tokens of the visible patches only (CLS first).

    uint8 images are scaled to [0, 1]; ``mean`` / ``std`` (C values) normalise per channel inside the op.
    """
    if prefers_compiled_reference("embed_visible_patches", images):
        return _compiled("embed_visible_patches", embed_visible_patches_reference)(
            images, ids_keep, weight, bias, pos_embed, cls_token, mean, std
        )
    if use_triton(images, ids_keep, weight, bias, pos_embed, cls_token):
        return _backend().embed_visible_patches(
            images, ids_keep, weight, bias, pos_embed, cls_token, mean=mean, std=std
        )
    return embed_visible_patches_reference(images, ids_keep, weight, bias, pos_embed, cls_token, mean, std)


def decoder_unshuffle(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor,
    *,
    reorder: bool = True,
) -> torch.Tensor:
    """(B, 1+K, Dd) visible decoder tokens -> (B, 1+L, Dd) full sequence in image order.

    ``reorder=False`` keeps the shuffled order (visible rows, then mask tokens; see the reference).
    """
    if prefers_compiled_reference("decoder_unshuffle", x):
        compiled = _compiled("decoder_unshuffle", decoder_unshuffle_reference)
        return compiled(x, ids_restore, mask_token, pos_embed, reorder)
    if use_triton(x, ids_restore, mask_token, pos_embed):
        return _backend().decoder_unshuffle(x, ids_restore, mask_token, pos_embed, reorder=reorder)
    return decoder_unshuffle_reference(x, ids_restore, mask_token, pos_embed, reorder)


def masked_patch_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    *,
    ids_restore: torch.Tensor | None = None,
    mean=None,
    std=None,
) -> torch.Tensor:
    """Per-patch MSE on removed patches (``mask`` 1) against (optionally normalised) pixel targets.

    ``ids_restore``: pred is in the shuffled order of ``decoder_unshuffle(..., reorder=False)``, possibly only its
    last rows (the removed patches). The kernel path does not differentiate through ``images``.
    """
    if prefers_compiled_reference("masked_patch_loss", pred):
        return _compiled("masked_patch_loss", masked_patch_loss_reference)(
            pred, images, mask, patch_size, norm_pix, eps, ids_restore, mean, std
        )
    if use_triton(pred, images, mask, ids_restore) and not images.requires_grad:
        return _backend().masked_patch_loss(
            pred, images, mask, patch_size, norm_pix, eps, ids_restore=ids_restore, mean=mean, std=std
        )
    return masked_patch_loss_reference(pred, images, mask, patch_size, norm_pix, eps, ids_restore, mean, std)
