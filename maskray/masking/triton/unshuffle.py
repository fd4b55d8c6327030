"""Decoder input in one pass: visible tokens back in image order, mask token elsewhere, plus positions.

``out[b, 0] = x[b, 0] + pos[0]``; ``out[b, 1+i] = (r < K ? x[b, 1+r] : mask_token) + pos[1+i]`` with
``r = ids_restore[b, i]``. With ``reorder=False`` the row of patch i is ``1+r`` instead of ``1+i`` (shuffled
order: visible rows stay where the encoder left them, mask tokens follow), still with position ``pos[1+i]``.

Backward, one pass over the output gradient, no atomics: ``dx[b, 1+r] = g[b, row(i)]`` for kept patches (each
dx row written exactly once since ids_restore is a permutation), ``dx[b, 0] = g[b, 0]``, and the mask-token
gradient is summed per program into fp32 partials, then ``partials.sum(0)`` (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from maskray.masking.reference import gather_tokens
from maskray.masking.triton._common import INTERPRET, next_pow2


@triton.jit
def _unshuffle_rows(pid_m, ids_ptr, M, L, K, stride_kb, REORDER: tl.constexpr, BLOCK_M: tl.constexpr):
    """Index bookkeeping shared by forward and backward for the source rows of one program (image order)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    b = (rows // (L + 1)).to(tl.int64)
    t = rows - b * (L + 1)  # 0 = CLS, 1 + i = patch i
    is_cls = row_ok & (t == 0)
    is_patch = row_ok & (t > 0)
    r = tl.load(ids_ptr + b * stride_kb + (t - 1), mask=is_patch, other=0).to(tl.int64)
    from_x = is_cls | (is_patch & (r < K))
    x_row = tl.where(is_cls, 0, 1 + r)
    if REORDER:
        out_row = t
    else:
        out_row = x_row
    return b, t, row_ok, is_patch, from_x, x_row, out_row


@triton.jit
def _unshuffle_fwd_kernel(
    x_ptr,
    ids_ptr,
    mask_ptr,
    pos_ptr,
    out_ptr,
    M,
    L,
    K,
    N,
    stride_xb,
    stride_xt,
    stride_kb,
    REORDER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, t, row_ok, is_patch, from_x, x_row, out_row = _unshuffle_rows(
        tl.program_id(0), ids_ptr, M, L, K, stride_kb, REORDER, BLOCK_M
    )
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    x = tl.load(x_ptr + (b * stride_xb + x_row * stride_xt)[:, None] + cols[None, :],
                mask=from_x[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    token = tl.load(mask_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    val = tl.where(from_x[:, None], x, token[None, :])
    pos = tl.load(pos_ptr + t[:, None] * N + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    val = val + pos.to(tl.float32)
    dst = (b * (L + 1) + out_row)[:, None] * N + cols[None, :]
    tl.store(out_ptr + dst, val.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _unshuffle_bwd_kernel(
    g_ptr,
    ids_ptr,
    dx_ptr,
    part_ptr,
    M,
    L,
    K,
    N,
    stride_kb,
    REORDER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, t, row_ok, is_patch, from_x, x_row, out_row = _unshuffle_rows(
        pid_m, ids_ptr, M, L, K, stride_kb, REORDER, BLOCK_M
    )
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    g = tl.load(g_ptr + (b * (L + 1) + out_row)[:, None] * N + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    dst = (b * (K + 1) + x_row)[:, None] * N + cols[None, :]
    tl.store(dx_ptr + dst, g.to(dx_ptr.dtype.element_ty), mask=from_x[:, None] & col_ok[None, :])
    is_token = is_patch & (~from_x)
    part = tl.sum(tl.where(is_token[:, None], g, 0.0), 0)
    tl.store(part_ptr + pid_m.to(tl.int64) * N + cols, part, mask=col_ok)


def _blocks(rows: int, width: int) -> tuple[int, int]:
    block_n = min(next_pow2(width), 256)
    if INTERPRET:
        return max(1, min(64, next_pow2(rows))), block_n
    return max(1, 4096 // block_n), block_n


class _DecoderUnshuffle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_restore, mask_token, pos_embed, reorder):
        batch, length = ids_restore.shape
        keep = x.shape[1] - 1
        width = x.shape[-1]
        if x.shape[0] != batch or not 0 <= keep <= length:
            raise ValueError(f"x {tuple(x.shape)} does not fit ids_restore {tuple(ids_restore.shape)}")
        if pos_embed.shape[-2] != length + 1 or pos_embed.shape[-1] != width or mask_token.shape[-1] != width:
            raise ValueError(f"pos_embed {tuple(pos_embed.shape)} / mask_token {tuple(mask_token.shape)} "
                             f"do not fit L={length}, Dd={width}")
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
        if x.stride(-1) != 1:
            x = x.contiguous()
        ids = ids_restore.contiguous()
        pos = pos_embed.detach().reshape(length + 1, width).contiguous()
        token = mask_token.detach().reshape(width).contiguous()
        out = torch.empty(batch, length + 1, width, device=x.device, dtype=out_dtype)
        rows = batch * (length + 1)
        block_m, block_n = _blocks(rows, width)
        if out.numel():
            grid = (triton.cdiv(rows, block_m), triton.cdiv(width, block_n))
            _unshuffle_fwd_kernel[grid](
                x, ids, token, pos, out, rows, length, keep, width, x.stride(0), x.stride(1), ids.stride(0),
                REORDER=bool(reorder), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
            )
        ctx.save_for_backward(ids)
        ctx.meta = (bool(reorder), keep, x.dtype, mask_token.shape, mask_token.dtype, pos_embed.shape,
                    pos_embed.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        reorder, keep, x_dtype, token_shape, token_dtype, pos_shape, pos_dtype = ctx.meta
        need_x, _, need_token, need_pos, _ = ctx.needs_input_grad
        batch, length = ids.shape
        width = grad_out.shape[-1]
        g = grad_out.contiguous()
        d_x = d_token = d_pos = None
        if need_x or need_token:
            rows = batch * (length + 1)
            block_m, block_n = _blocks(rows, width)
            programs = triton.cdiv(rows, block_m)
            d_x = torch.empty(batch, keep + 1, width, device=g.device, dtype=x_dtype)
            parts = torch.empty(programs, width, device=g.device, dtype=torch.float32)
            _unshuffle_bwd_kernel[(programs, triton.cdiv(width, block_n))](
                g, ids, d_x, parts, rows, length, keep, width, ids.stride(0),
                REORDER=reorder, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
            )
            d_token = parts.sum(dim=0).to(token_dtype).view(token_shape) if need_token else None
            d_x = d_x if need_x else None
        if need_pos:
            if reorder:
                d_pos = g.sum(dim=0, dtype=torch.float32)
            else:
                d_pos = torch.cat([g[:, :1], gather_tokens(g[:, 1:], ids)], dim=1).sum(dim=0, dtype=torch.float32)
            d_pos = d_pos.to(pos_dtype).view(pos_shape)
        return d_x, None, d_token, d_pos, None


def decoder_unshuffle(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor,
    *,
    reorder: bool = True,
) -> torch.Tensor:
    """Triton implementation of :func:`maskray.masking.ops.decoder_unshuffle` (same semantics)."""
    return _DecoderUnshuffle.apply(x, ids_restore, mask_token, pos_embed, reorder)
