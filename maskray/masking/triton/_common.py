"""Shared helpers for the Triton masking kernels.

``INTERPRET`` records whether this package was imported with ``TRITON_INTERPRET=1``: Triton reads that variable
when ``@triton.jit`` decorates a kernel, so the kernels of this package are either interpreted (numpy, any
device) or compiled (CUDA only) for the lifetime of the process. The dispatcher in :mod:`maskray.masking.ops`
only sends CPU tensors here when ``INTERPRET`` is true.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Triton reads TRITON_INTERPRET when ``triton.language`` is first imported (its library functions such as
# ``tl.sum`` are ``@triton.jit`` objects too): tests set it before anything imports Triton (tests/conftest.py).


def cuda_tuning_enabled() -> bool:
    """Autotuning needs a GPU driver: only when CUDA is present and the kernels are compiled."""
    return (not INTERPRET) and torch.cuda.is_available()


def autotune_if_cuda(configs: list, key: list[str]):
    """``triton.autotune(configs, key)`` on a CUDA machine, the identity otherwise (interpreter, CPU-only)."""

    def wrap(kernel):
        if cuda_tuning_enabled():
            return triton.autotune(configs=configs, key=key)(kernel)
        return kernel

    return wrap


def is_autotuned(kernel) -> bool:
    return isinstance(kernel, triton.runtime.Autotuner)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def image_affine(
    channels: int, dtype: torch.dtype, mean, std, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (scale, shift) such that ``normalised = pixel * scale + shift``; None when it is the identity.

    Same folding as :func:`maskray.masking.reference.normalize_images`.
    """
    from maskray.masking.reference import image_affine as _affine

    if dtype != torch.uint8 and mean is None and std is None:
        return None
    scale, shift = _affine(channels, dtype, mean, std, device)
    return scale.contiguous(), shift.contiguous()


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The matmul dtype autocast would pick on ``device`` (else ``default``)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


def dot_dtype_and_precision(mm_dtype: torch.dtype) -> tuple[object, str]:
    """``tl.dot`` operand dtype and input precision for a matmul in ``mm_dtype``.

    The interpreter computes bf16 dots on raw bit patterns, so it always uses fp32 IEEE dots. On the GPU fp32
    follows ``torch.backends.cuda.matmul.allow_tf32``; half types use tensor cores with fp32 accumulation.
    """
    import triton.language as tl

    if INTERPRET:
        return tl.float32, "ieee"
    if mm_dtype == torch.bfloat16:  # precision only matters for fp32 operands; "tf32" is Triton's default
        return tl.bfloat16, "tf32"
    if mm_dtype == torch.float16:
        return tl.float16, "tf32"
    return tl.float32, ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
