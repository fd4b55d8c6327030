"""The MAE decoder: a small ViT over the full sequence (visible latents + mask tokens) predicting pixels."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from maskray.masking import decoder_unshuffle
from maskray.models.pos_embed import sincos_2d


class MAEDecoder(nn.Module):
    """Args: embed_dim (encoder width D), grid (gh, gw), patch_dim (p*p*C), dim / depth / num_heads of the
    decoder (Dd). Position embeddings are fixed 2-D sin-cos; LayerNorm eps 1e-6 as in the MAE reference (and
    Hugging Face's and lightly's MAE decoders)."""

    def __init__(
        self,
        embed_dim: int,
        grid: tuple[int, int],
        patch_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self.apply(_init_linear_and_norm)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: (B, 1+K, D) encoder output (CLS first); ids_restore: (B, L). Returns (B, L, p*p*C)."""
        return self.pred(self.norm(self._decode(latent, ids_restore, reorder=True)))[:, 1:]

    def forward_removed(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The predictions of the removed patches only, what the loss uses: (B, L-K, p*p*C) in the shuffled order
        (row j is patch ``ids_shuffle[b, K + j]``; ``masked_patch_loss(..., ids_restore=)`` reads it).

        The blocks see :meth:`forward`'s tokens in another order, the same computation with additive positions;
        the final norm and the prediction skip the CLS and visible rows (and the unshuffle its gather)."""
        return self.pred(self.norm(self._decode(latent, ids_restore, reorder=False)[:, latent.shape[1]:]))

    def _decode(self, latent: torch.Tensor, ids_restore: torch.Tensor, reorder: bool) -> torch.Tensor:
        """(B, 1+L, Dd) after the blocks, before the final norm."""
        x = self.embed(latent)  # the fixed table is an fp32 buffer, which DeepSpeed's bf16 mode leaves in fp32
        x = decoder_unshuffle(x, ids_restore, self.mask_token, self.pos_embed.to(x.dtype), reorder=reorder)
        for block in self.blocks:
            x = block(x)
        return x


def _init_linear_and_norm(module: nn.Module) -> None:
    """MAE init: xavier-uniform Linear weights with zero bias; LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
