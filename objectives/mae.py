"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al. 2021).

The encoder embeds and processes only the visible 25% of patches; a light decoder reconstructs the
pixels of the removed ones; the loss is the per-patch MSE on removed patches against per-patch
normalised targets (``norm_pix``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from maskray.masking import masked_patch_loss, num_visible, patchify, random_mask_indices, unpatchify
from maskray.models import MAEDecoder, MaskedViT
from maskray.objective import Objective, ObjectiveOutput, ObjectiveParams, register_objective


class MAEParams(ObjectiveParams):
    mask_ratio: float = Field(0.75, ge=0.0, lt=1.0)
    norm_pix: bool = True
    decoder_dim: int = Field(128, gt=0)
    decoder_depth: int = Field(2, gt=0)
    decoder_heads: int = Field(4, gt=0)


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
        self.num_keep = num_visible(encoder.num_patches, params.mask_ratio)

    def forward(self, batch: dict[str, torch.Tensor], step: int, noise: torch.Tensor | None = None) -> ObjectiveOutput:
        """batch["image"]: (B, C, H, W). ``noise`` (B, L) fixes the mask (tests, held-out loss)."""
        images = batch["image"]
        if noise is None:
            noise = torch.rand(images.shape[0], self.encoder.num_patches, device=images.device)
        masking = random_mask_indices(noise, self.num_keep)
        latent = self.encoder(images, ids_keep=masking.ids_keep).tokens  # (B, 1+K, D)
        pred = self.decoder(latent, masking.ids_restore)  # (B, L, p*p*C)
        loss = masked_patch_loss(pred, images, masking.mask, self.encoder.patch_size, self.params.norm_pix)
        return ObjectiveOutput(loss=loss, metrics={"mask_ratio": masking.mask.mean().detach()})

    @torch.no_grad()
    def figures(self, batch: dict[str, torch.Tensor], count: int = 8) -> dict[str, object]:
        """``reconstructions.png``: input, visible patches, reconstruction (visible patches pasted back)."""
        from maskray.tracking.figures import image_rows_figure

        images = batch["image"][:count]
        patch, grid, channels = self.encoder.patch_size, self.encoder.grid_size, self.encoder.in_chans
        masking = random_mask_indices(torch.rand(images.shape[0], self.encoder.num_patches, device=images.device),
                                      self.num_keep)
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
