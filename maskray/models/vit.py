"""A timm VisionTransformer whose encoder can run only the visible tokens.

:class:`MaskedViT` owns an unmodified ``timm`` ``VisionTransformer`` (``self.vit``), so its state dict is a
timm state dict and loads into ``timm.create_model(arch, ...)`` with the same keyword overrides. Two kinds of
masking are supported (spec section 1.2):

- drop (MAE style): ``ids_keep`` (B, K): only the kept patches are embedded and run through the blocks;
- replace (BERT style): ``replace_mask`` (B, L) in {0, 1} with a ``mask_token`` (1, 1, D): every position
  is fed, masked ones get the mask token before the position embedding is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch
import torch.nn as nn

from maskray.masking import embed_visible_patches
from maskray.models.pos_embed import sincos_2d


@dataclass
class EncoderOutput:
    """tokens: (B, 1+n, D) after the final norm (CLS first); layers: block index -> (B, 1+n, D) block
    outputs before the final norm; attn: block index -> (B, H, 1+n, 1+n) attention probabilities."""

    tokens: torch.Tensor
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    attn: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def cls(self) -> torch.Tensor:
        """(B, D) CLS token after the final norm."""
        return self.tokens[:, 0]

    @property
    def patches(self) -> torch.Tensor:
        """(B, n, D) patch tokens after the final norm."""
        return self.tokens[:, 1:]


def attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Recompute the softmax attention of a timm ``Attention`` module explicitly.

    x: (B, N, D) block input after ``norm1``. Returns (B, H, N, N).
    """
    batch, length, dim = x.shape
    qkv = attn.qkv(x).reshape(batch, length, 3, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class MaskedViT(nn.Module):
    """Encoder wrapper around ``timm.create_model(arch, num_classes=0, **overrides)``.

    Args:
        arch: a timm ViT name, e.g. ``vit_tiny_patch16_224`` ... ``vit_huge_patch14_224``.
        img_size, patch_size, in_chans, depth: overrides passed to timm (``depth=None`` keeps the arch's).
        pos_embed: ``"sincos"`` (fixed 2-D sin-cos, not trained, as MAE) or ``"learned"``.
        drop_path_rate: stochastic depth.
    """

    def __init__(
        self,
        arch: str,
        img_size: int,
        patch_size: int,
        in_chans: int = 3,
        depth: int | None = None,
        pos_embed: str = "sincos",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        overrides: dict = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans)
        if depth is not None:
            overrides["depth"] = depth
        self.arch = arch
        self.timm_kwargs = overrides
        self.vit = timm.create_model(arch, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **overrides)
        if self.vit.cls_token is None or self.vit.no_embed_class:
            raise ValueError(f"{arch}: maskray needs a ViT with a CLS token and a position slot for it")
        if pos_embed == "sincos":
            with torch.no_grad():
                self.vit.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_size))
            self.vit.pos_embed.requires_grad_(False)
        elif pos_embed != "learned":
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self._init_mae_style()

    def _init_mae_style(self) -> None:
        """MAE init: xavier-uniform patch projection (flattened), CLS ~ N(0, 0.02)."""
        weight = self.vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.vit.cls_token, std=0.02)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    @property
    def in_chans(self) -> int:
        return self.vit.patch_embed.proj.in_channels

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def embed(
        self,
        images: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        replace_mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images: (B, C, H, W) -> (B, 1+n, D) tokens with positions; n = K with ``ids_keep`` else L."""
        proj = self.vit.patch_embed.proj
        if replace_mask is None:
            vit = self.vit
            return embed_visible_patches(images, ids_keep, proj.weight, proj.bias, vit.pos_embed, vit.cls_token)
        if ids_keep is not None or mask_token is None:
            raise ValueError("replace_mask needs a mask_token and excludes ids_keep")
        tokens = self.vit.patch_embed(images)  # (B, L, D)
        weight = replace_mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1.0 - weight) + mask_token.to(tokens.dtype) * weight
        cls = self.vit.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.vit.pos_embed

    def forward_tokens(
        self,
        images: torch.Tensor,
        *,
        ids_keep: torch.Tensor | None = None,
        replace_mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        return_layers: tuple[int, ...] = (),
        return_attn: bool = False,
    ) -> EncoderOutput:
        """Run the encoder. ``return_layers`` picks block indices (0-based) whose outputs are returned."""
        x = self.vit.norm_pre(self.vit.pos_drop(self.embed(images, ids_keep, replace_mask, mask_token)))
        layers: dict[int, torch.Tensor] = {}
        attn: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.vit.blocks):
            if return_attn:
                attn[index] = attention_probs(block.attn, block.norm1(x))
            x = block(x)
            if index in return_layers:
                layers[index] = x
        return EncoderOutput(tokens=self.vit.norm(x), layers=layers, attn=attn)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked forward: (B, C, H, W) -> (B, 1+L, D) normalised tokens."""
        return self.forward_tokens(images).tokens

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """A state dict that ``timm.create_model(self.arch, num_classes=0, **self.timm_kwargs)`` loads."""
        return {key: value.detach().cpu().clone() for key, value in self.vit.state_dict().items()}
