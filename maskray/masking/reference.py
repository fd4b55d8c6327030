"""Plain-PyTorch implementations of the masking ops: the CPU path and the test oracle for the kernels.

Indices are expanded (never repeated), so no index copy as large as the output is written, and nothing
is promoted to a wider dtype than its inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskray.masking.patches import patchify, patchify_chw


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (B, L, D), ids: (B, K) -> (B, K, D), rows ``x[b, ids[b, k]]``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_patches_chw(images: torch.Tensor, ids: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images: (B, C, H, W), ids: (B, K) patch indices (row-major grid) -> (B, K, C, p, p) copies of those patches.

    Indexes a strided 6-D view, so only the selected pixels are copied (no full patchify first).
    """
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch size {patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    view = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size).permute(0, 2, 4, 1, 3, 5)
    rows = torch.arange(batch, device=images.device).unsqueeze(1)
    return view[rows, ids // grid_w, ids % grid_w]


def image_affine(
    channels: int, dtype: torch.dtype, mean=None, std=None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float32 (scale, shift), ``normalised = pixel * scale + shift``.

    uint8 pixels are first scaled to [0, 1]; then ``(x - mean[c]) / std[c]`` when given (sequences or tensors
    of C values, or scalars, in [0, 1] units).
    """
    base = 1.0 / 255.0 if dtype == torch.uint8 else 1.0
    mean_t = torch.zeros(channels) if mean is None else torch.as_tensor(mean, dtype=torch.float64).cpu()
    std_t = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=torch.float64).cpu()
    mean_t = mean_t.double().reshape(-1).expand(channels)
    std_t = std_t.double().reshape(-1).expand(channels)
    scale, shift = base / std_t, -mean_t / std_t
    return scale.float().to(device), shift.float().to(device)


def normalize_images(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1], then per-channel ``(x - mean) / std`` if given (half images compute in
    float32); float images without mean/std are returned unchanged."""
    if images.dtype != torch.uint8 and mean is None and std is None:
        return images
    scale, shift = image_affine(images.shape[1], images.dtype, mean, std, images.device)
    dtype = torch.float32 if images.dtype == torch.uint8 else torch.promote_types(images.dtype, torch.float32)
    return images.to(dtype) * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)


def embed_visible_patches_reference(
    images: torch.Tensor,
    ids_keep: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor | None,
    mean=None,
    std=None,
) -> torch.Tensor:
    """Embed only the visible patches and prepend the CLS row.

    images: (B, C, H, W); ids_keep: (B, K) or None for all L patches; weight: (D, C, p, p) (timm Conv2d
    layout); bias: (D,); pos_embed: (1, 1+L, D) with the CLS slot first (or (1, L, D) without CLS);
    cls_token: (1, 1, D) or None; mean / std: optional per-channel normalisation (see
    :func:`normalize_images`; uint8 images are always scaled to [0, 1]). Returns (B, 1+K, D) (or (B, K, D)
    without CLS).
    """
    dim, _, patch, _ = weight.shape
    has_cls = cls_token is not None
    pos_patches = pos_embed[:, 1:] if has_cls else pos_embed  # (1, L, D)
    if ids_keep is not None:
        patches = gather_patches_chw(images, ids_keep, patch)  # (B, K, C, p, p), copies only the kept pixels
        patches = normalize_images(patches.flatten(0, 1), mean, std).reshape(*ids_keep.shape, -1)
        pos = gather_tokens(pos_patches.expand(images.shape[0], -1, -1), ids_keep)
    else:
        patches = patchify_chw(normalize_images(images, mean, std), patch)  # (B, L, C*p*p)
        pos = pos_patches
    tokens = F.linear(patches, weight.reshape(dim, -1), bias) + pos
    if not has_cls:
        return tokens
    cls = (cls_token + pos_embed[:, :1]).expand(images.shape[0], -1, -1)
    return torch.cat([cls, tokens], dim=1)


def inverse_permutation(ids: torch.Tensor) -> torch.Tensor:
    """ids: (B, L) permutations -> their inverses (``ids_shuffle`` from ``ids_restore`` and back)."""
    order = torch.arange(ids.shape[1], device=ids.device, dtype=ids.dtype).expand_as(ids)
    return torch.empty_like(ids).scatter_(1, ids, order)


def decoder_unshuffle_reference(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor,
    reorder: bool = True,
) -> torch.Tensor:
    """Put visible tokens back in image order, fill the rest with the mask token, add positions.

    x: (B, 1+K, Dd) with the CLS row first; ids_restore: (B, L); mask_token: (1, 1, Dd);
    pos_embed: (1, 1+L, Dd). Returns (B, 1+L, Dd). With ``reorder=False`` the rows stay in the shuffled
    order (visible first, then mask tokens; row 1+j is patch ``ids_shuffle[b, j]`` and gets its position),
    which is the same computation up to a token permutation for a decoder with additive positions only.
    """
    batch, length = ids_restore.shape
    visible = x[:, 1:]
    fill = mask_token.expand(batch, length - visible.shape[1], -1)
    if not reorder:
        tokens = torch.cat([visible, fill], dim=1)
        pos = gather_tokens(pos_embed[:, 1:].expand(batch, -1, -1), inverse_permutation(ids_restore))
        return torch.cat([x[:, :1] + pos_embed[:, :1], tokens + pos], dim=1)
    tokens = gather_tokens(torch.cat([visible, fill], dim=1), ids_restore)
    return torch.cat([x[:, :1], tokens], dim=1) + pos_embed


def masked_patch_loss_reference(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    ids_restore: torch.Tensor | None = None,
    mean=None,
    std=None,
) -> torch.Tensor:
    """MAE reconstruction loss on the removed patches only.

    pred: (B, L, p*p*C) in (p, q, c) order; images: (B, C, H, W); mask: (B, L), 1 = removed.
    Targets are normalised per patch with the unbiased variance when ``norm_pix``. Returns a scalar:
    the per-patch MSE averaged over removed patches of the whole batch.
    ``ids_restore`` (B, L): pred is in the shuffled order of ``decoder_unshuffle(..., reorder=False)`` and
    may hold only its last M <= L rows (the removed ones): patch i is row ``ids_restore[b, i] - (L - M)``;
    patches without a row count as visible. uint8 images and ``mean``/``std`` as in :func:`normalize_images`.
    """
    if ids_restore is not None:
        rows = ids_restore - (ids_restore.shape[1] - pred.shape[1])
        mask = mask * (rows >= 0)
        pred = gather_tokens(pred, rows.clamp_min(0))
    target = patchify(normalize_images(images, mean, std), patch_size)
    target = target.to(torch.promote_types(target.dtype, torch.float32))  # at least fp32 (fp64 kept: gradcheck)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.to(target.dtype) - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
