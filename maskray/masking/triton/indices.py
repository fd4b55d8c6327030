"""Random-masking indices by rank-by-comparison: no sort, equal to ``argsort(noise, stable=True)``.

One program ranks ``BLOCK_I`` keys of one row against the whole row in ``BLOCK_J`` chunks:
``rank_i = #{j : n_j < n_i or (n_j == n_i and j < i)}`` (ties broken by index, i.e. a stable sort). Then
``ids_restore[b, i] = rank_i``, ``ids_keep[b, rank_i] = i`` when ``rank_i < K`` (unique targets: plain
stores) and ``mask[b, i] = rank_i >= K``. NaN keys are not supported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from maskray.masking.indices import MaskIndices
from maskray.masking.triton._common import INTERPRET, next_pow2


@triton.jit
def _rank_kernel(
    noise_ptr,
    keep_ptr,
    restore_ptr,
    mask_ptr,
    L,
    K,
    stride_nb,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    ok_i = offs_i < L
    row = noise_ptr + b * stride_nb
    key_i = tl.load(row + offs_i, mask=ok_i, other=0.0)
    rank = tl.full([BLOCK_I], 0, tl.int32)
    for j0 in range(0, L, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        ok_j = offs_j < L
        key_j = tl.load(row + offs_j, mask=ok_j, other=0.0)
        less = key_j[None, :] < key_i[:, None]
        tie = (key_j[None, :] == key_i[:, None]) & (offs_j[None, :] < offs_i[:, None])
        before = (less | tie) & ok_j[None, :]
        rank += tl.sum(before.to(tl.int32), 1)
    tl.store(restore_ptr + b * L + offs_i, rank.to(tl.int64), mask=ok_i)
    tl.store(mask_ptr + b * L + offs_i, (rank >= K).to(tl.float32), mask=ok_i)
    tl.store(keep_ptr + b * K + rank, offs_i.to(tl.int64), mask=ok_i & (rank < K))


def random_mask_indices(noise: torch.Tensor, num_keep: int) -> MaskIndices:
    """noise: (B, L) float -> MaskIndices (ids_keep (B, K) int64, ids_restore (B, L) int64, mask (B, L) fp32)."""
    if noise.dim() != 2:
        raise ValueError(f"noise must be (B, L), got {tuple(noise.shape)}")
    batch, length = noise.shape
    if not 0 <= num_keep <= length:
        raise ValueError(f"num_keep={num_keep} outside [0, {length}]")
    if noise.stride(1) != 1:
        noise = noise.contiguous()
    if noise.dtype in (torch.float16, torch.bfloat16):
        noise = noise.float()  # exact; the interpreter cannot compare bf16
    ids_keep = torch.empty(batch, num_keep, device=noise.device, dtype=torch.int64)
    ids_restore = torch.empty(batch, length, device=noise.device, dtype=torch.int64)
    mask = torch.empty(batch, length, device=noise.device, dtype=torch.float32)
    if batch and length:
        # interpreter: one program per row (numpy broadcasts are cheap); GPU: 64x64 compare tiles
        block_i = min(next_pow2(length), 256) if INTERPRET else 64
        block_j = min(next_pow2(length), 256) if INTERPRET else 64
        grid = (batch, triton.cdiv(length, block_i))
        keep_arg = ids_keep if num_keep else ids_restore  # never hand an empty (null) pointer to the launcher
        _rank_kernel[grid](
            noise, keep_arg, ids_restore, mask, length, num_keep, noise.stride(0),
            BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4,
        )
    return MaskIndices(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)
