"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al. 2021).

The encoder embeds and processes only the visible 25% of patches (one drop pass, the noise drawn from the rank's
step generator); a light decoder reconstructs the pixels of the removed ones; the loss is the per-patch MSE on
removed patches against per-patch normalised targets (``norm_pix``).

vs the reference: the decoder's final norm and prediction run on the removed patches only (the reference predicts
every patch and masks the loss; lightly's MAE does the same as here), in the shuffled order, which is the same
loss: the decoder blocks see the same tokens in another order and have additive positions only.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from maskray.context import StepContext
from maskray.masking import masked_patch_loss, num_visible, patchify, random_mask_indices, unpatchify
from maskray.models import MAEDecoder, MaskedViT
from maskray.objective import Objective, ObjectiveOutput, ObjectiveParams, register_objective
from maskray.passes import EncoderPass, MaskSpec, PassOutput


class MAEParams(ObjectiveParams):
    mask_ratio: float = Field(0.75, ge=0.0, lt=1.0, description="share of patches removed from the encoder's input")
    norm_pix: bool = Field(True, description="targets are per-patch normalised pixels")
    decoder_dim: int = Field(128, gt=0, description="decoder width")
    decoder_depth: int = Field(2, gt=0, description="decoder blocks")
    decoder_heads: int = Field(4, gt=0, description="decoder attention heads")


@register_objective("mae")
class MAE(Objective):
    Config = MAEParams

    def __init__(self, encoder: MaskedViT, params: MAEParams) -> None:
        super().__init__(encoder, params)
        patch_dim = encoder.patch_size**2 * encoder.in_chans
        self.decoder = MAEDecoder(
            encoder.embed_dim,
            encoder.grid_size,
            patch_dim,
            dim=params.decoder_dim,
            depth=params.decoder_depth,
            num_heads=params.decoder_heads,
        )

    def passes(self) -> dict[str, EncoderPass]:
        return {"visible": EncoderPass("image", MaskSpec("random", ratio=self.params.mask_ratio))}

    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        """batch["image"]: (B, C, H, W); outputs["visible"]: the encoder on its visible patches (B, 1+K, D)."""
        visible = outputs["visible"]
        ids_restore = visible.indices.ids_restore
        pred = self.decoder.forward_removed(visible.out.tokens, ids_restore)  # (B, L-K, p*p*C), removed patches
        loss = masked_patch_loss(pred, batch["image"], visible.mask, self.encoder.patch_size, self.params.norm_pix,
                                 ids_restore=ids_restore)
        return ObjectiveOutput(loss=loss, metrics={"mask_ratio": visible.mask.mean().detach()})

    @torch.no_grad()
    def figures(self, batch: dict[str, Any], count: int = 8) -> dict[str, object]:
        """``reconstructions.png``: input, visible patches, reconstruction (visible patches pasted back)."""
        from maskray.tracking.figures import image_rows_figure

        images = batch["image"][:count]
        patch, grid, channels = self.encoder.patch_size, self.encoder.grid_size, self.encoder.in_chans
        noise = torch.rand(images.shape[0], self.encoder.num_patches, device=images.device,
                           generator=torch.Generator(images.device).manual_seed(0))
        masking = random_mask_indices(noise, num_visible(self.encoder.num_patches, self.params.mask_ratio))
        pred = self.decoder(self.encoder(images, ids_keep=masking.ids_keep).tokens, masking.ids_restore)
        target = patchify(images, patch).float()
        pred = pred.float()
        if self.params.norm_pix:  # undo the per-patch normalisation with the true patch statistics
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        removed = masking.mask.unsqueeze(-1)
        rows = {
            "input": images,
            "visible": unpatchify(target * (1 - removed), patch, grid, channels),
            "reconstruction": unpatchify(target * (1 - removed) + pred * removed, patch, grid, channels),
        }
        return {"reconstructions.png": image_rows_figure(rows)}
