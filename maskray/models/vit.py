"""A timm ViT (``VisionTransformer`` or ``Beit``) whose encoder can run only the visible tokens.

:class:`MaskedViT` owns an unmodified ``timm`` model (``self.vit``), so its state dict is a timm state dict and
loads into ``timm.create_model(arch, num_classes=0, **encoder.timm_kwargs)``. Two kinds of masking are supported
(spec section 1.2), both through :meth:`MaskedViT.forward`, the one entry point (ZeRO-3 gathers parameters in
module forwards, see :mod:`maskray.models.zero`):

- drop (MAE style): ``ids_keep`` (B, K): only the kept patches are embedded and run through the blocks;
- replace (BERT style): ``replace_mask`` (B, L) in {0, 1}: every position is fed, masked ones get the encoder's
  ``mask_token`` (created by :meth:`MaskedViT.add_mask_token`) before the position embedding is added.

Images of another size than ``img_size`` (e.g. MSN's small focal crops) get the absolute position embedding
resampled to their grid (bicubic, CLS slot kept), as timm does for ``dynamic_img_size``.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from timm.layers import resample_abs_pos_embed
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer

from maskray.masking import embed_visible_patches
from maskray.models.pos_embed import sincos_2d

PosEmbed = Literal["sincos", "learned", "none"]
RelPosBias = Literal["none", "shared", "per_block", "both"]


class EncoderOutput(NamedTuple):
    """tokens: (B, 1+n, D) after the final norm (CLS first); layers: block index -> (B, 1+n, D) block
    outputs before the final norm; attn: block index -> (B, H, 1+n, 1+n) attention probabilities.

    A named tuple (of a tensor and dicts) so that DeepSpeed ZeRO-3 finds the output tensors and attaches the
    encoder's pre-backward hook, which gathers its (external) parameters for the backward pass.
    """

    tokens: torch.Tensor
    layers: dict[int, torch.Tensor]
    attn: dict[int, torch.Tensor]

    @property
    def cls(self) -> torch.Tensor:
        """(B, D) CLS token after the final norm."""
        return self.tokens[:, 0]

    @property
    def patches(self) -> torch.Tensor:
        """(B, n, D) patch tokens after the final norm."""
        return self.tokens[:, 1:]


def is_beit_arch(arch: str) -> bool:
    """Whether ``arch`` is a registered timm model built by ``timm.models.beit`` (``beit_*``, ``beitv2_*``)."""
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__ == "timm.models.beit"


# Name parts of the timm VisionTransformer / Beit archs that MaskedViT rejects: register tokens or no class
# position slot (reg, xp, radio, tipsv2, flexivit, deit3), no CLS token (gap, map, siglip, rpn, aimv2), a
# distillation token, parallel blocks without one attention (18x2); timm's test models.
_REJECTED_ARCH = re.compile(r"_reg\d|gap|_map_|siglip|_xp_|radio|tipsv2|aimv2|flexivit|deit3|distilled|_rpn_|"
                            r"_\d+x[2-9]_|^test_")
_ARCH_MODULES = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.beit")


def accepted_archs() -> list[str]:
    """The timm arch names :class:`MaskedViT` wraps, decided by the entry point's module (ViT, DeiT, Beit) and
    the name (see ``_REJECTED_ARCH``), without building them; sorted."""
    return [name for name in timm.list_models()
            if timm.models.model_entrypoint(name).__module__ in _ARCH_MODULES and not _REJECTED_ARCH.search(name)]


def attention_probs(attn: nn.Module, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Recompute the softmax attention of a timm ``Attention`` (ViT) or Beit ``Attention`` module explicitly.

    x: (B, N, D) block input after ``norm1``; shared_rel_pos_bias: (H, N, N) Beit's shared bias or None.
    Beit attention includes its per-block relative position bias. Returns (B, H, N, N).
    Reads the attention weights outside their owners' forward: under ZeRO-3 call it with the parameters gathered.
    """
    batch, length, _ = x.shape
    if isinstance(attn, BeitAttention):
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias)
    else:
        qkv = attn.qkv(x)
    qkv = qkv.reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    if not isinstance(attn, BeitAttention):
        q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    if isinstance(attn, BeitAttention) and attn.relative_position_bias_table is not None:
        table = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
        logits = logits + table.view(length, length, -1).permute(2, 0, 1)
    if shared_rel_pos_bias is not None:
        logits = logits + shared_rel_pos_bias
    return logits.softmax(dim=-1)


def set_fused_attention(module: nn.Module, fused: bool) -> int:
    """Switch every timm attention (ViT, Beit) under ``module`` between ``F.scaled_dot_product_attention`` (fused)
    and timm's explicit ``softmax(q k^T * scale) v``; returns how many were switched. The same maths: on CPU in
    bf16 torch's flash-attention backward takes about 3x the explicit form's time (``BENCHMARKS.md``)."""
    count = 0
    for child in module.modules():
        if hasattr(child, "fused_attn") and hasattr(child, "qkv"):
            child.fused_attn = fused
            count += 1
    return count


class MaskedViTCfg(BaseModel):
    """Every option of a :class:`MaskedViT`, defined once (as timm's typed model configs): the run config's
    ``model`` section (:class:`maskray.config.ModelConfig`) extends it, an export stores it (``init_kwargs``), and
    :class:`MaskedViT` is built from it and nothing else.

    ``arch``: a timm ViT name (``vit_tiny_patch16_224`` ... ``vit_huge_patch14_224``) or a timm Beit name
    (``beit_base_patch16_224``, ``beitv2_base_patch16_224``, ...); ``img_size``, ``patch_size``, ``in_chans``,
    ``depth`` are passed to timm (``depth`` None keeps the arch's).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "vit_tiny_patch16_224"
    img_size: int = Field(16, gt=0)
    patch_size: int = Field(4, gt=0, validate_default=True)
    in_chans: int = Field(3, gt=0)
    depth: int | None = Field(4, gt=0, description="overrides the arch's depth; null keeps it")
    pos_embed: PosEmbed = Field(
        "sincos", description="absolute position embedding: sincos (fixed 2-D sin-cos, not trained, as MAE), "
        "learned, or none (only with a relative position bias, as BEiT v2)"
    )
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth (timm's linear decay)")
    layer_scale: float | None = Field(None, gt=0.0, description="LayerScale init (timm init_values); null: none, "
                                      "whatever the arch's default")
    rel_pos_bias: RelPosBias = Field(
        "none", validate_default=True, description="BEiT relative position bias (timm Beit archs only): one table "
        "shared by all blocks, one per block, or both added (as DTM)"
    )

    @field_validator("patch_size")
    @classmethod
    def _patch_divides_image(cls, patch_size: int, info: ValidationInfo) -> int:
        img_size = info.data.get("img_size")
        if img_size is not None and img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        return patch_size

    @field_validator("rel_pos_bias")
    @classmethod
    def _position_options_fit_arch(cls, rel_pos_bias: RelPosBias, info: ValidationInfo) -> RelPosBias:
        arch, pos_embed = info.data.get("arch"), info.data.get("pos_embed")
        if rel_pos_bias != "none" and arch is not None and not is_beit_arch(arch):
            raise ValueError(f"{rel_pos_bias!r} needs a timm Beit arch (beit_*, beitv2_*), got arch {arch!r}")
        if pos_embed == "none" and rel_pos_bias == "none":
            raise ValueError("pos_embed 'none' needs a relative position bias")
        return rel_pos_bias

    @classmethod
    def of(cls, options: BaseModel) -> MaskedViTCfg:
        """The backbone options of a config that extends this one (the run's ``model`` section)."""
        if type(options) is cls:
            return options
        return cls.model_validate(options.model_dump(include=set(cls.model_fields)))


class MaskedViT(nn.Module):
    """Encoder wrapper around ``timm.create_model(arch, num_classes=0, **timm_kwargs)``, built from its options
    (:class:`MaskedViTCfg`; a config that extends it, such as the run's ``model`` section, is accepted)."""

    def __init__(self, cfg: MaskedViTCfg) -> None:
        super().__init__()
        cfg = MaskedViTCfg.of(cfg)
        self.cfg, self.arch = cfg, cfg.arch
        # init_values 0.0, not None, turns LayerScale off: timm.create_model drops None kwargs (arch defaults win)
        overrides: dict = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                               init_values=0.0 if cfg.layer_scale is None else cfg.layer_scale)
        if cfg.depth is not None:
            overrides["depth"] = cfg.depth
        if is_beit_arch(cfg.arch):  # final norm on the tokens (timm's Beit defaults to a norm after average pooling)
            overrides.update(
                use_abs_pos_emb=cfg.pos_embed != "none",
                use_rel_pos_bias=cfg.rel_pos_bias in ("per_block", "both"),
                use_shared_rel_pos_bias=cfg.rel_pos_bias in ("shared", "both"),
                use_fc_norm=False,
            )
        self.timm_kwargs = overrides
        self.vit = timm.create_model(cfg.arch, pretrained=False, num_classes=0, drop_path_rate=cfg.drop_path_rate,
                                     **overrides)
        arch = cfg.arch
        if not isinstance(self.vit, (VisionTransformer, Beit)):
            raise ValueError(f"{arch}: maskray supports timm VisionTransformer and Beit archs")
        if isinstance(self.vit, VisionTransformer) and (self.vit.no_embed_class or self.vit.pos_embed is None):
            raise ValueError(f"{arch}: maskray needs a ViT with a position slot for the CLS token")
        if self.vit.cls_token is None or not isinstance(self.vit.patch_embed.norm, nn.Identity):
            raise ValueError(f"{arch}: maskray needs a CLS token and a patch embedding without norm")
        if self.vit.num_prefix_tokens != 1:
            raise ValueError(f"{arch}: maskray needs the CLS token as the only prefix token")
        if not all(hasattr(getattr(block, "attn", None), "qkv") for block in self.vit.blocks):
            raise ValueError(f"{arch}: maskray needs blocks with one fused qkv attention (block.attn.qkv)")
        self.has_rel_pos_bias = cfg.rel_pos_bias != "none"
        self.register_parameter("mask_token", None)
        if cfg.pos_embed == "sincos":
            with torch.no_grad():
                self.vit.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_size))
            self.vit.pos_embed.requires_grad_(False)
        self._init_mae_style()

    def _init_mae_style(self) -> None:
        """MAE init: xavier-uniform patch projection (flattened), CLS ~ N(0, 0.02)."""
        weight = self.vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.vit.cls_token, std=0.02)

    @property
    def init_kwargs(self) -> dict:
        """The options as a JSON-able dict (an export's ``init_kwargs`` metadata; ``MaskedViTCfg(**init_kwargs)``)."""
        return self.cfg.model_dump(mode="json")

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

    def add_mask_token(self) -> nn.Parameter:
        """Create (on the first call) and return ``self.mask_token`` (1, 1, D) ~ N(0, 0.02), used by the replace
        path. It lives outside ``self.vit``, so :meth:`timm_state_dict` is unchanged. Call it before DeepSpeed
        wraps the model (an objective's ``__init__``)."""
        if self.mask_token is None:
            cls = self.vit.cls_token
            self.mask_token = nn.Parameter(torch.empty(1, 1, self.embed_dim, device=cls.device, dtype=cls.dtype))
            nn.init.normal_(self.mask_token, std=0.02)
        return self.mask_token

    def external_parameters(self) -> list[nn.Parameter]:
        """The parameters :meth:`forward` reads outside their owner's forward (the fused patch embedding reads
        the projection weight and bias, and the CLS token and position embedding are read directly); see
        :func:`maskray.models.zero.register_external_parameters`."""
        proj = self.vit.patch_embed.proj
        return [p for p in (proj.weight, proj.bias, self.vit.cls_token, self.vit.pos_embed) if p is not None]

    def no_weight_decay(self) -> set[str]:
        """Names (as in ``self.named_parameters()``) to exclude from weight decay: timm's own list (prefixed
        ``vit.``: position embedding, CLS token, relative position bias tables) and the mask token."""
        names = {f"vit.{name}" for name in self.vit.no_weight_decay()} | {"mask_token"}
        return names & {name for name, _ in self.named_parameters()}

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """(1, 1 + gh*gw, D) absolute position embedding for a (gh, gw) patch grid (the model's own table at its
        own grid, else bicubic resampling of the patch part, CLS slot kept); None without one."""
        if self.vit.pos_embed is None:
            return None
        return resample_abs_pos_embed(self.vit.pos_embed, new_size=list(grid), old_size=list(self.grid_size))

    def embed(
        self,
        images: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        replace_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images: (B, C, H, W) -> (B, 1+n, D) input of the first block (tokens with positions, after
        ``pos_drop`` and a ViT's ``norm_pre``); n = K with ``ids_keep`` (B, K), else L = (H/p)(W/p).

        ``ids_keep`` indexes this view's own row-major grid; ``replace_mask`` (B, L) in {0, 1} swaps masked
        patches for the mask token. With a relative position bias, views must have the model's size and masking
        must be replace-style (the bias tables are sized for the full grid).
        """
        patch = self.patch_size
        if images.shape[-2] % patch or images.shape[-1] % patch:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by patch size {patch}")
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        if self.has_rel_pos_bias:
            if ids_keep is not None:
                raise ValueError("a relative position bias covers the full grid: use replace_mask, not ids_keep")
            if grid != self.grid_size:
                raise ValueError(f"a relative position bias is sized for the {self.grid_size} grid, got {grid}")
        if ids_keep is not None and replace_mask is not None:
            raise ValueError("ids_keep and replace_mask exclude each other")
        if replace_mask is not None and self.mask_token is None:
            raise ValueError("replace_mask needs the mask token: call add_mask_token() when building the objective")
        proj, pos_embed = self.vit.patch_embed.proj, self.pos_embed_for(grid)
        if replace_mask is None and pos_embed is not None:
            x = embed_visible_patches(images, ids_keep, proj.weight, proj.bias, pos_embed, self.vit.cls_token)
        else:
            tokens = proj(images).flatten(2).transpose(1, 2)  # (B, L, D)
            if replace_mask is not None:
                weight = replace_mask.unsqueeze(-1).to(tokens.dtype)
                tokens = tokens * (1.0 - weight) + self.mask_token.to(tokens.dtype) * weight
            x = torch.cat([self.vit.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            if pos_embed is not None:
                x = x + pos_embed
        x = self.vit.pos_drop(x)
        return self.vit.norm_pre(x) if isinstance(self.vit, VisionTransformer) else x

    def forward(
        self,
        images: torch.Tensor,
        *,
        ids_keep: torch.Tensor | None = None,
        replace_mask: torch.Tensor | None = None,
        return_layers: tuple[int, ...] = (),
        return_attn: bool = False,
    ) -> EncoderOutput:
        """Run the encoder on images (B, C, H, W); masking as in :meth:`embed`.

        ``return_layers`` picks block indices (0-based) whose outputs are returned; ``return_attn`` recomputes
        every block's attention probabilities (see :func:`attention_probs` for ZeRO-3).
        """
        if any(not 0 <= index < self.depth for index in return_layers):
            raise ValueError(f"return_layers {tuple(return_layers)} outside the {self.depth} blocks")
        x = self.embed(images, ids_keep, replace_mask)
        beit = isinstance(self.vit, Beit)
        shared_bias = self.vit.rel_pos_bias() if beit and self.vit.rel_pos_bias is not None else None
        layers: dict[int, torch.Tensor] = {}
        attn: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.vit.blocks):
            if return_attn:
                attn[index] = attention_probs(block.attn, block.norm1(x), shared_bias)
            x = block(x, shared_rel_pos_bias=shared_bias) if beit else block(x)
            if index in return_layers:
                layers[index] = x
        return EncoderOutput(tokens=self.vit.norm(x), layers=layers, attn=attn)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """A state dict that ``timm.create_model(self.arch, num_classes=0, **self.timm_kwargs)`` loads."""
        return {key: value.detach().cpu().clone() for key, value in self.vit.state_dict().items()}
