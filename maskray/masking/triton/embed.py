"""Visible-only patch embedding: gather patches from the image, project, add bias + position, write CLS.

Forward is one fused kernel: a GEMM of (B*(1+K), C*p*p) x (C*p*p, D) whose A operand is gathered straight
from the (B, C, H, W) image (any strides; float or uint8 with the normalisation folded in), columns in the
Conv2d weight order (c, p, q). Row ``b*(1+K)`` is the CLS row (A row masked to zero, epilogue adds
``cls + pos[0]``); row ``b*(1+K) + 1 + j`` is patch ``ids_keep[b, j]`` (epilogue adds ``bias + pos[1 + id]``).

Backward (no atomics anywhere, all reductions deterministic):
- dW: a gather kernel re-reads the visible patches from the image into a packed (B*K, C*p*p) matrix (never
  saved from the forward), then one ``torch.mm``; db / dcls: ``torch.sum``.
- dpos (only if the table requires grad): ``dpos[1+i] = sum_b g[b, 1+inv[b,i]]`` over images where patch i
  was kept: a gather-reduce kernel over the batch, inv being the inverse of ``ids_keep``.
- dimage (only if the images require grad): ``dA = g @ W`` then a kernel that writes every image pixel once
  in gather form (kept patch -> its dA row times the normalisation scale, removed patch -> 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from maskray.masking.triton._common import (
    autotune_if_cuda,
    compute_dtype,
    dot_dtype_and_precision,
    image_affine,
    is_autotuned,
    next_pow2,
)

_TL_TO_TORCH = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}

_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]


@autotune_if_cuda(configs=_FWD_CONFIGS, key=["M", "N", "KDIM"])
@triton.jit
def _embed_fwd_kernel(
    img_ptr,
    ids_ptr,
    w_ptr,
    bias_ptr,
    pos_ptr,
    cls_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    M,
    N,
    KDIM,
    T,
    GW,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_kb,
    P: tl.constexpr,
    HAS_IDS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CLS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    b = rows // T
    t = rows - b * T
    if HAS_CLS:
        j = t - 1
    else:
        j = t
    is_patch = row_ok & (j >= 0)
    b64 = b.to(tl.int64)
    if HAS_IDS:
        p = tl.load(ids_ptr + b64 * stride_kb + j, mask=is_patch, other=0).to(tl.int64)
    else:
        p = j.to(tl.int64)
    p = tl.where(is_patch, p, 0)
    py = p // GW
    px = p - py * GW
    row_off = b64 * stride_ib + (py * P) * stride_ih + (px * P) * stride_iw

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < KDIM
        c = kk // (P * P)
        rem = kk - c * (P * P)
        pi = rem // P
        q = rem - pi * P
        k_off = c * stride_ic + pi * stride_ih + q * stride_iw
        a_mask = is_patch[:, None] & k_ok[None, :]
        a = tl.load(img_ptr + row_off[:, None] + k_off[None, :], mask=a_mask, other=0).to(tl.float32)
        if NORMALIZE:
            sc = tl.load(scale_ptr + c, mask=k_ok, other=0.0)
            sh = tl.load(shift_ptr + c, mask=k_ok, other=0.0)
            a = tl.where(a_mask, a * sc[None, :] + sh[None, :], 0.0)
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * KDIM + kk[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)

    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_CLS:
        pos_row = tl.where(is_patch, p + 1, 0)
    else:
        pos_row = p
    pos = tl.load(pos_ptr + pos_row[:, None] * N + cols[None, :], mask=out_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where(is_patch[:, None], bias[None, :], 0.0)
    acc += pos
    if HAS_CLS:
        cls = tl.load(cls_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where((row_ok & (j < 0))[:, None], cls[None, :], 0.0)
    out_offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gather_patches_kernel(
    img_ptr,
    ids_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    M,
    K,
    KDIM,
    GW,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_kb,
    P: tl.constexpr,
    HAS_IDS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[b*K + j, :] = normalised patch ids_keep[b, j] of image b, (c, p, q) order."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = kk < KDIM
    b = rows // K
    j = rows - b * K
    b64 = b.to(tl.int64)
    if HAS_IDS:
        p = tl.load(ids_ptr + b64 * stride_kb + j, mask=row_ok, other=0).to(tl.int64)
    else:
        p = j.to(tl.int64)
    py = p // GW
    px = p - py * GW
    c = kk // (P * P)
    rem = kk - c * (P * P)
    pi = rem // P
    q = rem - pi * P
    offs = (b64 * stride_ib + (py * P) * stride_ih + (px * P) * stride_iw)[:, None] + (
        c * stride_ic + pi * stride_ih + q * stride_iw
    )[None, :]
    mask = row_ok[:, None] & k_ok[None, :]
    a = tl.load(img_ptr + offs, mask=mask, other=0).to(tl.float32)
    if NORMALIZE:
        sc = tl.load(scale_ptr + c, mask=k_ok, other=0.0)
        sh = tl.load(shift_ptr + c, mask=k_ok, other=0.0)
        a = a * sc[None, :] + sh[None, :]
    out_offs = rows[:, None].to(tl.int64) * KDIM + kk[None, :]
    tl.store(out_ptr + out_offs, a.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_grad_to_image_kernel(
    da_ptr,
    inv_ptr,
    scale_ptr,
    dimg_ptr,
    M,
    L,
    K,
    KDIM,
    GW,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    P: tl.constexpr,
    HAS_INV: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Gather form of the pixel gradient: every pixel of patch (b, i) is written once, from dA row
    b*K + inv[b, i] (times the normalisation scale) or 0 when the patch was removed. No zero-init, no atomics."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = kk < KDIM
    b = rows // L
    i = rows - b * L
    b64 = b.to(tl.int64)
    if HAS_INV:
        r = tl.load(inv_ptr + b64 * L + i, mask=row_ok, other=-1).to(tl.int64)
    else:
        r = i.to(tl.int64)
    src_ok = row_ok & (r >= 0)
    mask = row_ok[:, None] & k_ok[None, :]
    da = tl.load(da_ptr + (b64 * K + r)[:, None] * KDIM + kk[None, :], mask=src_ok[:, None] & k_ok[None, :],
                 other=0.0).to(tl.float32)
    c = kk // (P * P)
    rem = kk - c * (P * P)
    pi = rem // P
    q = rem - pi * P
    if HAS_SCALE:
        sc = tl.load(scale_ptr + c, mask=k_ok, other=0.0)
        da = da * sc[None, :]
    py = i // GW
    px = i - py * GW
    offs = (b64 * stride_ib + (py * P).to(tl.int64) * stride_ih + (px * P).to(tl.int64) * stride_iw)[:, None] + (
        c * stride_ic + pi * stride_ih + q * stride_iw
    )[None, :]
    tl.store(dimg_ptr + offs, da.to(dimg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pos_grad_kernel(
    g_ptr,
    inv_ptr,
    dpos_ptr,
    B,
    L,
    N,
    stride_gb,
    stride_gt,
    ROW_OFF: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dpos[ROW_OFF + i] = sum over b of g[b, ROW_OFF + inv[b, i]] where inv[b, i] >= 0 (fixed order in b)."""
    offs_i = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = offs_i < L
    col_ok = cols < N
    acc = tl.full((BLOCK_L, BLOCK_N), 0.0, tl.float32)
    inv_row = inv_ptr
    g_img = g_ptr
    for _ in range(0, B):
        r = tl.load(inv_row + offs_i, mask=i_ok, other=-1).to(tl.int64)
        ok = i_ok & (r >= 0)
        g = tl.load(g_img + (ROW_OFF + r)[:, None] * stride_gt + cols[None, :],
                    mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += g.to(tl.float32)
        inv_row += L
        g_img += stride_gb
    offs = (ROW_OFF + offs_i)[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(dpos_ptr + offs, acc, mask=i_ok[:, None] & col_ok[None, :])


def _clamp_block(n: int, low: int, high: int) -> int:
    return max(low, min(high, next_pow2(n)))


def _inverse_keep(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """(B, K) unique patch ids -> (B, L) position of each patch in ids_keep, -1 where removed."""
    batch, keep = ids_keep.shape
    order = torch.arange(keep, device=ids_keep.device, dtype=torch.int64).expand(batch, keep)
    return torch.full((batch, length), -1, device=ids_keep.device, dtype=torch.int64).scatter_(
        1, ids_keep.long(), order
    )


def gather_patches(
    images: torch.Tensor,
    ids_keep: torch.Tensor | None,
    patch: int,
    dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, C, H, W) -> packed (B*K, C*p*p) visible patches in (c, p, q) order, normalised, in ``dtype``."""
    batch, channels, height, width = images.shape
    grid_w, length = width // patch, (height // patch) * (width // patch)
    keep = length if ids_keep is None else ids_keep.shape[1]
    kdim = channels * patch * patch
    out = torch.empty(batch * keep, kdim, device=images.device, dtype=dtype)
    if out.numel() == 0:
        return out
    block_m, block_k = (16, 128) if kdim >= 128 else (64, next_pow2(kdim))
    ids = ids_keep if ids_keep is not None else out
    dummy = scale if scale is not None else out
    grid = (triton.cdiv(batch * keep, block_m), triton.cdiv(kdim, block_k))
    _gather_patches_kernel[grid](
        images, ids, dummy, shift if shift is not None else dummy, out,
        batch * keep, keep, kdim, grid_w, *images.stride(), ids_keep.stride(0) if ids_keep is not None else 0,
        P=patch, HAS_IDS=ids_keep is not None, NORMALIZE=scale is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )
    return out


class _EmbedVisiblePatches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, ids_keep, weight, bias, pos_embed, cls_token, scale, shift):
        batch, channels, height, width = images.shape
        dim, w_chans, patch, patch_w = weight.shape
        if w_chans != channels or patch != patch_w:
            raise ValueError(f"weight {tuple(weight.shape)} does not match images {tuple(images.shape)}")
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not divisible by patch size {patch}")
        grid_w, length = width // patch, (height // patch) * (width // patch)
        keep = length if ids_keep is None else ids_keep.shape[1]
        has_cls = cls_token is not None
        tokens = keep + int(has_cls)
        kdim = channels * patch * patch
        if pos_embed.shape[-2] != length + int(has_cls) or pos_embed.shape[-1] != dim:
            raise ValueError(f"pos_embed {tuple(pos_embed.shape)} does not fit L={length}, D={dim}, cls={has_cls}")

        mm_dtype = compute_dtype(images.device, weight.dtype)
        dot_dtype, precision = dot_dtype_and_precision(mm_dtype)
        out_dtype = torch.promote_types(mm_dtype, pos_embed.dtype)
        if has_cls:
            out_dtype = torch.promote_types(out_dtype, cls_token.dtype)
        w2 = weight.detach().reshape(dim, kdim).to(_TL_TO_TORCH[dot_dtype]).contiguous()
        pos = pos_embed.detach().reshape(-1, dim).contiguous()
        ids = ids_keep.contiguous() if ids_keep is not None else None
        out = torch.empty(batch, tokens, dim, device=images.device, dtype=out_dtype)
        rows = batch * tokens
        if out.numel():
            dummy = pos
            args = (
                images, ids if ids is not None else dummy, w2, bias.detach() if bias is not None else dummy, pos,
                cls_token.detach().reshape(-1) if has_cls else dummy,
                scale if scale is not None else dummy, shift if shift is not None else dummy, out,
                rows, dim, kdim, tokens, grid_w, *images.stride(), ids.stride(0) if ids is not None else 0,
            )
            meta = dict(
                P=patch, HAS_IDS=ids is not None, HAS_BIAS=bias is not None, HAS_CLS=has_cls,
                NORMALIZE=scale is not None, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
            )
            if is_autotuned(_embed_fwd_kernel):
                grid = lambda m: (triton.cdiv(rows, m["BLOCK_M"]), triton.cdiv(dim, m["BLOCK_N"]))
                _embed_fwd_kernel[grid](*args, **meta)
            else:
                block_m, block_n, block_k = _clamp_block(rows, 16, 64), _clamp_block(dim, 16, 64), _clamp_block(
                    kdim, 16, 64
                )
                grid = (triton.cdiv(rows, block_m), triton.cdiv(dim, block_n))
                _embed_fwd_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                        num_warps=4)

        ctx.save_for_backward(images, ids, weight, scale, shift)
        ctx.meta = (has_cls, mm_dtype, length, keep, patch)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.pos_shape, ctx.pos_dtype = pos_embed.shape, pos_embed.dtype
        ctx.cls_shape = cls_token.shape if has_cls else None
        ctx.cls_dtype = cls_token.dtype if has_cls else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        images, ids, weight, scale, shift = ctx.saved_tensors
        has_cls, mm_dtype, length, keep, patch = ctx.meta
        need_img, _, need_w, need_b, need_pos, need_cls, _, _ = ctx.needs_input_grad
        batch = images.shape[0]
        dim = weight.shape[0]
        g = grad_out.contiguous()
        start = int(has_cls)
        g_rows = g[:, start:]  # (B, K, D)
        d_img = d_w = d_b = d_pos = d_cls = None
        if need_w:
            patches = gather_patches(images, ids, patch, mm_dtype, scale, shift)  # (B*K, C*p*p)
            g_mat = g_rows.reshape(batch * keep, dim).to(mm_dtype)
            d_w = torch.mm(g_mat.t(), patches).to(weight.dtype).view_as(weight)
        if need_b:
            d_b = g_rows.sum(dim=(0, 1), dtype=torch.float32).to(ctx.bias_dtype)
        if need_cls:
            d_cls = g[:, 0].sum(dim=0, dtype=torch.float32).to(ctx.cls_dtype).view(ctx.cls_shape)
        if need_pos:
            d_pos = torch.empty(length + start, dim, device=g.device, dtype=torch.float32)
            if has_cls:
                d_pos[0] = g[:, 0].sum(dim=0, dtype=torch.float32)
            if ids is None:
                d_pos[start:] = g_rows.sum(dim=0, dtype=torch.float32)
            else:
                inv = _inverse_keep(ids, length)
                block_l, block_n = 16, _clamp_block(dim, 16, 128)
                grid = (triton.cdiv(length, block_l), triton.cdiv(dim, block_n))
                _pos_grad_kernel[grid](
                    g, inv, d_pos, batch, length, dim, g.stride(0), g.stride(1),
                    ROW_OFF=start, BLOCK_L=block_l, BLOCK_N=block_n, num_warps=4,
                )
            d_pos = d_pos.to(ctx.pos_dtype).view(ctx.pos_shape)
        if need_img:
            channels = images.shape[1]
            kdim = channels * patch * patch
            g_mat = g_rows.reshape(batch * keep, dim).to(mm_dtype)
            d_patches = torch.mm(g_mat, weight.reshape(dim, kdim).to(mm_dtype))  # (B*K, C*p*p)
            d_img = torch.empty_like(images)
            inv = _inverse_keep(ids, length) if ids is not None else d_patches
            block_m, block_k = (16, 128) if kdim >= 128 else (64, next_pow2(kdim))
            grid = (triton.cdiv(batch * length, block_m), triton.cdiv(kdim, block_k))
            _patch_grad_to_image_kernel[grid](
                d_patches, inv, scale if scale is not None else d_patches, d_img,
                batch * length, length, keep, kdim, images.shape[-1] // patch, *d_img.stride(),
                P=patch, HAS_INV=ids is not None, HAS_SCALE=scale is not None,
                BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
            )
        return d_img, None, d_w, d_b, d_pos, d_cls, None, None


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
    """Triton implementation of :func:`maskray.masking.ops.embed_visible_patches` (same semantics)."""
    affine = image_affine(images.shape[1], images.dtype, mean, std, images.device)
    scale, shift = affine if affine is not None else (None, None)
    return _EmbedVisiblePatches.apply(images, ids_keep, weight, bias, pos_embed, cls_token, scale, shift)
