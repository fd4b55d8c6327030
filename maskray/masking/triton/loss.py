"""Fused MAE pixel loss: gather target patches from the image, normalise per patch, MSE on removed patches.

One program handles ``BLOCK_M`` patches (full patch vectors, (p, q, c) order as MAE's ``patchify``): it reads the
patch pixels straight from the (B, C, H, W) image (float or uint8, optional per-channel normalisation), computes
mean and unbiased variance, the normalised target, the row MSE, and writes the gradient of the loss with respect
to pred right away: ``dpred = 2 w (pred - t) / (P * sum(w))`` (w = mask weight, 0 for visible patches). The loss
is a sum of per-program partials (deterministic); backward only scales the saved dpred by ``grad_output``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from maskray.masking.triton._common import INTERPRET, image_affine, next_pow2


@triton.jit
def _masked_patch_loss_kernel(
    pred_ptr,
    img_ptr,
    mask_ptr,
    rows_ptr,
    scale_ptr,
    shift_ptr,
    denom_ptr,
    dpred_ptr,
    part_ptr,
    M,
    L,
    ROW_SHIFT,
    GW,
    PD,
    stride_pb,
    stride_pt,
    stride_db,
    stride_dt,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    eps,
    P: tl.constexpr,
    C: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    NORM_PIX: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    b = (rows // L).to(tl.int64)
    i = rows - b * L
    w = tl.load(mask_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_ROWS:
        pr = tl.load(rows_ptr + rows, mask=row_ok, other=0).to(tl.int64) - ROW_SHIFT
        has_row = row_ok & (pr >= 0)
        pr = tl.where(has_row, pr, 0)
    else:
        pr = i
        has_row = row_ok
    w = tl.where(has_row, w, 0.0)
    active = has_row & (w != 0.0)

    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < PD
    pi = kk // (P * C)
    rem = kk - pi * (P * C)
    q = rem // C
    c = rem - q * C
    py = i // GW
    px = i - py * GW
    offs = (b * stride_ib + (py * P) * stride_ih + (px * P) * stride_iw)[:, None] + (
        c * stride_ic + pi * stride_ih + q * stride_iw
    )[None, :]
    lm = active[:, None] & k_ok[None, :]
    x = tl.load(img_ptr + offs, mask=lm, other=0).to(tl.float32)
    if NORMALIZE:
        sc = tl.load(scale_ptr + c, mask=k_ok, other=0.0)
        sh = tl.load(shift_ptr + c, mask=k_ok, other=0.0)
        x = tl.where(lm, x * sc[None, :] + sh[None, :], 0.0)
    if NORM_PIX:
        mean = tl.sum(x, 1) / PD
        xc = tl.where(lm, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, 1) / (PD - 1)
        target = xc / tl.sqrt(var + eps)[:, None]
    else:
        target = x
    pv = tl.load(pred_ptr + (b * stride_pb + pr * stride_pt)[:, None] + kk[None, :], mask=lm, other=0.0)
    diff = tl.where(lm, pv.to(tl.float32) - target, 0.0)
    row_loss = tl.sum(diff * diff, 1) / PD
    tl.store(part_ptr + pid, tl.sum(w * row_loss, 0))
    denom = tl.load(denom_ptr)
    coef = (2.0 * w) / (PD * denom)
    dst = (b * stride_db + pr * stride_dt)[:, None] + kk[None, :]
    tl.store(dpred_ptr + dst, (diff * coef[:, None]).to(dpred_ptr.dtype.element_ty),
             mask=has_row[:, None] & k_ok[None, :])


class _MaskedPatchLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, images, mask, ids_restore, scale, shift, patch, norm_pix, eps):
        batch, channels, height, width = images.shape
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not divisible by patch size {patch}")
        grid_w, length = width // patch, (height // patch) * (width // patch)
        pdim = patch * patch * channels
        if pred.shape[0] != batch or pred.shape[-1] != pdim or mask.shape != (batch, length):
            raise ValueError(f"pred {tuple(pred.shape)} / mask {tuple(mask.shape)} do not fit images "
                             f"{tuple(images.shape)} with patch {patch}")
        pred_rows = pred.shape[1]
        if ids_restore is None and pred_rows != length:
            raise ValueError(f"pred has {pred_rows} rows for {length} patches: pass ids_restore")
        if pred.stride(-1) != 1:
            pred = pred.contiguous()
        weights = mask.detach().to(torch.float32)
        if ids_restore is not None:
            ids = ids_restore.contiguous()
            row_shift = length - pred_rows
            weights = weights * (ids >= row_shift)
        else:
            ids, row_shift = weights, 0
        weights = weights.contiguous()
        denom = weights.sum().clamp_min(1.0).reshape(1)
        dpred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
        block_k = next_pow2(pdim)
        if INTERPRET:
            block_m = max(1, min(64, 8192 // block_k))
        else:
            block_m = max(1, min(16, 4096 // block_k))
        rows = batch * length
        programs = triton.cdiv(rows, block_m)
        parts = torch.empty(programs, device=pred.device, dtype=torch.float32)
        if rows:
            dummy = denom
            _masked_patch_loss_kernel[(programs,)](
                pred, images, weights, ids, scale if scale is not None else dummy,
                shift if shift is not None else dummy, denom, dpred, parts,
                rows, length, row_shift, grid_w, pdim, pred.stride(0), pred.stride(1), dpred.stride(0),
                dpred.stride(1), *images.stride(), float(eps),
                P=patch, C=channels, HAS_ROWS=ids_restore is not None, NORM_PIX=bool(norm_pix),
                NORMALIZE=scale is not None, BLOCK_M=block_m, BLOCK_K=block_k,
                num_warps=8 if block_m * block_k >= 8192 else 4,
            )
        ctx.save_for_backward(dpred)
        return parts.sum() / denom[0]

    @staticmethod
    def backward(ctx, grad_out):
        (dpred,) = ctx.saved_tensors
        d_pred = dpred * grad_out.to(dpred.dtype) if ctx.needs_input_grad[0] else None
        return d_pred, None, None, None, None, None, None, None, None


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
    """Triton implementation of :func:`maskray.masking.ops.masked_patch_loss` (same semantics)."""
    affine = image_affine(images.shape[1], images.dtype, mean, std, images.device)
    scale, shift = affine if affine is not None else (None, None)
    return _MaskedPatchLoss.apply(pred, images, mask, ids_restore, scale, shift, patch_size, norm_pix, eps)
