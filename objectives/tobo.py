"""ToBo: Token Bottleneck: One Token to Remember Dynamics (Kim et al. 2025, arXiv 2507.06543; naver-ai/tobo).

Each sample is a frame pair of one clip, cut with the same crop (:class:`~maskray.data.views.FramePair`: gap
uniform in 1..``max_gap``). The shared encoder sees the **reference** frame whole (squeeze: its CLS token is the
bottleneck) and ~10% of the **target** frame's patches (drop masking, ``mask_ratio`` 0.9). The decoder runs two
paths with shared weights, block by block (spec ``objectives.md`` section 7 and appendix A.7):

1. bottleneck path (the reference's ``sm`` path, the ToBo objective): [reference CLS ; target visible tokens and
   mask tokens in image order], self-attention + MLP only. The reference frame reaches it through its CLS token
   alone, and the target's own CLS is not used;
2. auxiliary path (the reference's ``csm`` path, SiamMAE / RSP propagation): [target CLS ; the same target
   tokens], each block first cross-attending to all 1+L reference tokens, then self-attention + MLP.

Both predict the target's pixels; the loss is the norm-pix MSE on the target's removed patches only:
``w_tobo * L_bottleneck + w_mim * L_aux`` (the released recipe, docs/Train.md: both 1.0).

Decisions vs the reference code (spec section 11, item 7):

- both frames get the *same* crop box (the reference's ``MultiRandomResizedCrop`` reuses its loop index as the
  second frame's top coordinate); the shared horizontal flip is kept;
- no hard-coded ``batch_size * repeated_sampling`` reshape: every shape comes from the runtime batch;
- one pair per clip sample per pass (no ``repeated_sampling``): the paper's 2 pairs per video per epoch are
  the same number of pairs as twice the passes, which ``configs/paper/tobo.yaml`` counts in steps (its learning
  rate is set explicitly, because the reference's rule scales by videos, not pairs);
- ``w_mim = 0`` builds no cross-attention at all (the pure bottleneck variant has no unused parameters), and
  ``w_tobo = 0`` skips the bottleneck path (pure propagation);
- decoder blocks are pre-norm residual sub-layers (cross-attention with its own query and key/value norms,
  timm self-attention, timm MLP) without drop-path, as in the reference's ``CSABlock`` (which also has none on
  the MLP); positions are fixed 2-D sin-cos, the reference's key/value tokens get the decoder's positions;
- the encoder's position embedding is maskray's (sin-cos by default, as the reference) and its CLS gets the CLS
  slot of that table; pair sampling draws the gap first, then the start (the reference draws the start in
  ``[0, T - max_gap - 1]`` and so never uses a clip's last frames with small gaps; ours uses every frame and
  accepts clips shorter than ``max_gap + 1``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from timm.layers import Mlp
from timm.models.vision_transformer import Attention

from maskray.config import DataConfig, ModelConfig
from maskray.context import StepContext
from maskray.data.views import FramePair, Views
from maskray.errors import ConfigError
from maskray.masking import decoder_unshuffle, masked_patch_loss
from maskray.models import MaskedViT, sincos_2d
from maskray.models.decoder import _init_linear_and_norm
from maskray.objective import Objective, ObjectiveOutput, ObjectiveParams, register_objective
from maskray.passes import EncoderPass, MaskSpec, PassOutput

REFERENCE, TARGET = "frames.0", "frames.1"


class ToBoParams(ObjectiveParams):
    mask_ratio: float = Field(0.9, ge=0.0, lt=1.0, description="share of the target frame's patches removed")
    max_gap: int = Field(4, ge=1, description="largest frame gap between reference and target (ToBo: 96)")
    norm_pix: bool = Field(True, description="targets are per-patch normalised pixels")
    w_tobo: float = Field(1.0, ge=0.0, description="weight of the bottleneck path's loss")
    w_mim: float = Field(1.0, ge=0.0, description="weight of the cross-attention (auxiliary) path's loss")
    decoder_dim: int = Field(128, gt=0, description="decoder width")
    decoder_depth: int = Field(2, gt=0, description="decoder blocks")
    decoder_heads: int = Field(4, gt=0, description="decoder attention heads")


class CrossAttention(nn.Module):
    """Multi-head attention of queries x (B, N, D) to keys/values from kv (B, M, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(x).reshape(batch, length, heads, head_dim).transpose(1, 2)
        k, v = self.kv(kv).reshape(batch, kv.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class ToBoBlock(nn.Module):
    """Pre-norm residual block: [cross-attention to ``kv``, when given and built], self-attention, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, cross: bool = True) -> None:
        super().__init__()
        if cross:
            self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.cross_attn = CrossAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D); kv: (B, M, D) or None (the bottleneck path: self-attention over x only)."""
        if kv is not None:
            x = x + self.cross_attn(self.norm_q(x), self.norm_kv(kv))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def bottleneck_sequence(reference_cls: torch.Tensor, target_sequence: torch.Tensor,
                        cls_pos: torch.Tensor) -> torch.Tensor:
    """The bottleneck path's input: the target sequence (B, 1+L, Dd) (target CLS first, then visible tokens and
    mask tokens in image order, with positions) with its CLS row replaced by the reference's CLS (B, 1, Dd) plus
    the CLS position (1, 1, Dd). Nothing else of the reference frame enters."""
    if reference_cls.shape[1] != 1:
        raise ValueError(f"the bottleneck is one token, got {reference_cls.shape[1]}")
    return torch.cat([reference_cls + cls_pos, target_sequence[:, 1:]], dim=1)


class ToBoDecoder(nn.Module):
    """Shared decoder of both paths. Args: embed_dim (encoder width D), grid (gh, gw), patch_dim (p*p*C), dim /
    depth / num_heads (Dd); ``cross``: build the cross-attention sub-layers (the auxiliary path)."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], patch_dim: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, cross: bool = True) -> None:
        super().__init__()
        self.cross = cross
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid), persistent=False)
        self.blocks = nn.ModuleList(ToBoBlock(dim, num_heads, mlp_ratio, cross) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self.apply(_init_linear_and_norm)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, reference: torch.Tensor, target: torch.Tensor, ids_restore: torch.Tensor,
                bottleneck: bool = True, aux: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """reference: (B, 1+L, D) encoder output of the whole reference frame; target: (B, 1+K, D) of the target's
        visible patches; ids_restore: (B, L). Returns the (B, L, p*p*C) predictions of the bottleneck path and of
        the auxiliary path (None for a path not asked for)."""
        if aux and not self.cross:
            raise ValueError("the auxiliary path needs the cross-attention sub-layers (built with cross=True)")
        if reference.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"the reference frame must be whole: {self.pos_embed.shape[1]} tokens expected, "
                             f"got {reference.shape[1]}")
        ref = self.embed(reference)
        seq_aux = decoder_unshuffle(self.embed(target), ids_restore, self.mask_token, self.pos_embed)
        seq_bot = bottleneck_sequence(ref[:, :1], seq_aux, self.pos_embed[:, :1]) if bottleneck else None
        kv = ref + self.pos_embed if aux else None
        for block in self.blocks:
            seq_bot = block(seq_bot) if bottleneck else None
            seq_aux = block(seq_aux, kv) if aux else None
        return tuple(None if seq is None else self.pred(self.norm(seq))[:, 1:] for seq in (seq_bot, seq_aux))


@register_objective("tobo")
class ToBo(Objective):
    Config = ToBoParams

    def __init__(self, encoder: MaskedViT, params: ToBoParams) -> None:
        super().__init__(encoder, params)
        patch_dim = encoder.patch_size**2 * encoder.in_chans
        self.decoder = ToBoDecoder(encoder.embed_dim, encoder.grid_size, patch_dim, dim=params.decoder_dim,
                                   depth=params.decoder_depth, num_heads=params.decoder_heads,
                                   cross=params.w_mim > 0)

    @classmethod
    def check_config(cls, config: ToBoParams, where: str) -> None:
        if config.w_tobo == 0 and config.w_mim == 0:
            raise ConfigError(f"key '{where}.w_tobo': w_tobo and w_mim are both 0, nothing to learn")
        if config.decoder_dim % config.decoder_heads or config.decoder_dim % 4:
            raise ConfigError(f"key '{where}.decoder_dim': {config.decoder_dim} must be divisible by 4 (sin-cos "
                              f"positions) and by decoder_heads {config.decoder_heads}")

    def inputs(self, model: ModelConfig, data: DataConfig) -> Views:
        """``frames``: (2, C, S, S) reference and target of one clip, one crop and flip for both."""
        return Views(frames=FramePair(model.img_size, self.params.max_gap, crop_scale=data.crop_scale,
                                      hflip=data.hflip, mean=data.mean, std=data.std, in_chans=model.in_chans))

    def passes(self) -> dict[str, EncoderPass]:
        return {"reference": EncoderPass(REFERENCE),
                "target": EncoderPass(TARGET, MaskSpec("random", ratio=self.params.mask_ratio))}

    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        """batch["frames"]: (B, 2, C, H, W); outputs: "reference" (B, 1+L, D), "target" (B, 1+K, D)."""
        reference, target = outputs["reference"], outputs["target"]
        params = self.params
        pred_bot, pred_aux = self.decoder(reference.out.tokens, target.out.tokens, target.indices.ids_restore,
                                          bottleneck=params.w_tobo > 0, aux=params.w_mim > 0)
        images = batch["frames"][:, 1]
        patch = self.encoder.patch_size
        metrics: dict[str, torch.Tensor] = {"mask_ratio": target.mask.mean().detach()}
        loss = images.new_zeros(())
        for name, pred, weight in (("bottleneck", pred_bot, params.w_tobo), ("aux", pred_aux, params.w_mim)):
            if pred is not None:
                part = masked_patch_loss(pred, images, target.mask, patch, params.norm_pix)
                loss = loss + weight * part
                metrics[f"loss_{name}"] = part.detach()
        return ObjectiveOutput(loss=loss, metrics=metrics)
