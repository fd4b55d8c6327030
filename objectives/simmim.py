"""SimMIM: A Simple Framework for Masked Image Modeling (Xie et al. 2021; microsoft/SimMIM, spec section 8.2).

Every patch goes through the encoder; the masked ones are replaced by the encoder's mask token (one replace pass
of a loader-made mask). The mask is random over a coarse grid of ``mask_block`` x ``mask_block`` patch squares
(the reference's 32-pixel mask patches over 16-pixel patches: ``mask_block=2``), ``ceil(ratio * squares)`` of them
masked (:class:`maskray.data.RandomMask`, the reference's ``MaskGenerator``). A linear head (1x1 conv to
``p*p*C`` channels, then PixelShuffle(p), the reference's decoder) turns the final-normed patch tokens back into a
full image; the loss is L1 against the input pixels on masked pixels only, divided by the masked-pixel count and
the channel count (:func:`masked_l1_loss`).

Decisions vs the reference code (spec section 11 lists no SimMIM item; these are the ones found reading it):

- Targets are the input image as the encoder sees it, i.e. in the run's normalisation (``data.mean/std``), no
  per-patch normalisation, as the reference (ImageNet-normalised input, ``F.l1_loss(x, x_rec)``).
- The mask is made in the loader processes per sample (the reference's transform does the same), drawn from the
  loader worker's seeded generator rather than the global ``np.random``.
- The head keeps the reference's conv + PixelShuffle channel order (channel slowest within a patch), not
  maskray's patchify order, so a reference decoder's weights would load unchanged.
- The mask token is N(0, 0.02) (:meth:`MaskedViT.add_mask_token`); the reference truncates it at +-0.02.
- The reference's step decay (x0.1 at epoch 700 of 800) and warm-up start lr 5e-7 are not reproduced: maskray's
  schedule is linear warm-up from 0 then half-cycle cosine (``configs/paper/simmim.yaml`` says so). Its crop uses
  bicubic interpolation where the reference's RandomResizedCrop is bilinear.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from pydantic import Field

from maskray.context import StepContext
from maskray.data.transforms import ImageTransform
from maskray.data.views import RandomMask, Views
from maskray.errors import ConfigError
from maskray.models import MaskedViT
from maskray.objective import Objective, ObjectiveOutput, ObjectiveParams, register_objective
from maskray.passes import EncoderPass, MaskSpec, PassOutput


class SimMIMParams(ObjectiveParams):
    mask_ratio: float = Field(0.6, gt=0.0, lt=1.0, description="share of mask squares replaced by the mask token")
    mask_block: int = Field(2, ge=1, description="side of a mask square in patches (reference: 32 px / 16 px = 2)")
    crop_scale: tuple[float, float] | None = Field(
        None, description="RandomResizedCrop scale of SimMIM's own view (reference (0.67, 1)); null: data.crop_scale"
    )


def pixel_mask(mask: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """mask: (B, L) patch mask, 1 = masked, L = gh * gw -> (B, 1, gh * patch, gw * patch) per-pixel mask."""
    if mask.ndim != 2 or mask.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"mask must be (B, {grid[0] * grid[1]}) for a {grid[0]}x{grid[1]} grid, "
                         f"got {tuple(mask.shape)}")
    pixels = mask.reshape(-1, *grid).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return pixels.unsqueeze(1)


def masked_l1_loss(reconstruction: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """SimMIM's loss: ``(|rec - x| * m).sum() / (m.sum() + 1e-5) / C`` with m the per-pixel mask.

    reconstruction, images: (B, C, H, W); mask: (B, L) patch mask (1 = masked) over the (H/p, W/p) grid. Only
    masked pixels count; the sum runs over the whole batch (not per sample). Computed in at least fp32.
    """
    if reconstruction.shape != images.shape or images.ndim != 4:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and images {tuple(images.shape)} must be "
                         "equal (B, C, H, W) shapes")
    if images.shape[-2] % patch or images.shape[-1] % patch:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by patch {patch}")
    dtype = torch.promote_types(images.dtype, torch.float32)
    weight = pixel_mask(mask.to(dtype), (images.shape[-2] // patch, images.shape[-1] // patch), patch)
    l1 = (reconstruction.to(dtype) - images.to(dtype)).abs()
    return (l1 * weight).sum() / (weight.sum() + 1e-5) / images.shape[1]


class PixelHead(nn.Module):
    """SimMIM's linear decoder: patch tokens (B, L, D) -> 1x1 conv to p*p*C -> PixelShuffle(p) -> (B, C, H, W)."""

    def __init__(self, dim: int, patch: int, in_chans: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(dim, patch**2 * in_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(patch)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch, length, dim = patches.shape
        feature_map = patches.transpose(1, 2).reshape(batch, dim, *self.grid)
        return self.shuffle(self.proj(feature_map))


@register_objective("simmim")
class SimMIM(Objective):
    """Views: ``simmim_image`` (its crop) and ``simmim_mask`` (B, L); one replace pass ``masked``."""

    Config = SimMIMParams
    IMAGE, MASK = "simmim_image", "simmim_mask"

    def __init__(self, encoder: MaskedViT, params: SimMIMParams) -> None:
        super().__init__(encoder, params)
        encoder.add_mask_token()
        self.head = PixelHead(encoder.embed_dim, encoder.patch_size, encoder.in_chans, encoder.grid_size)

    def check(self, model, data, where: str) -> None:
        grid = self.encoder.grid_size
        if grid[0] % self.params.mask_block or grid[1] % self.params.mask_block:
            raise ConfigError(f"key '{where}.mask_block': {self.params.mask_block} does not tile the "
                              f"{grid[0]}x{grid[1]} patch grid (model.img_size / model.patch_size)")

    def inputs(self, model, data) -> Views:
        grid = (model.img_size // model.patch_size,) * 2
        crop = ImageTransform(model.img_size, train=True, crop_scale=self.params.crop_scale or data.crop_scale,
                              hflip=data.hflip, mean=data.mean, std=data.std, in_chans=model.in_chans)
        return Views(**{self.IMAGE: crop, self.MASK: RandomMask(grid, self.params.mask_ratio, self.params.mask_block)})

    def passes(self) -> dict[str, EncoderPass]:
        return {"masked": EncoderPass(self.IMAGE, MaskSpec("batch", mode="replace", key=self.MASK))}

    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        """batch[IMAGE]: (B, C, H, W); outputs["masked"]: every patch, masked ones as the mask token (B, 1+L, D)."""
        masked = outputs["masked"]
        reconstruction = self.head(masked.out.patches)
        loss = masked_l1_loss(reconstruction, batch[self.IMAGE], masked.mask, self.encoder.patch_size)
        return ObjectiveOutput(loss=loss, metrics={"mask_ratio": masked.mask.mean().detach()})

    @torch.no_grad()
    def figures(self, batch: dict[str, Any], count: int = 8) -> dict[str, object]:
        """``reconstructions.png``: input, what the encoder sees (masked pixels zeroed), reconstruction (visible
        pixels pasted back)."""
        from maskray.tracking.figures import image_rows_figure

        images, mask = batch[self.IMAGE][:count], batch[self.MASK][:count].float()
        reconstruction = self.head(self.encoder(images, replace_mask=mask).patches).float()
        hidden = pixel_mask(mask, self.encoder.grid_size, self.encoder.patch_size).to(images.dtype)
        images = images.float()
        rows = {
            "input": images,
            "masked": images * (1 - hidden),
            "reconstruction": images * (1 - hidden) + reconstruction * hidden,
        }
        return {"reconstructions.png": image_rows_figure(rows)}
