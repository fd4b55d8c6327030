"""BEiT v2 stage 2: masked image modeling with visual tokens (Peng et al. 2022, "BEiT v2: Masked Image Modeling
with Vector-Quantized Visual Tokenizers"; spec ``objectives.md`` 5.2 and A.5; reference microsoft/unilm
``beit2/modeling_pretrain.py``, ``engine_for_pretraining.py``, ``masking_generator.py``).

A frozen VQ-KD tokenizer (a ``vqkd`` run's artifact, :func:`objectives.vqkd.load_tokenizer`) gives every patch
of the un-masked crop a code index, in the tokenizer's own normalisation (it sees the crop's [0, 1] pixels,
:class:`~maskray.data.views.SharedCrop`). The encoder sees the crop with a block-wise mask (BEiT's generator in the
loader, :class:`~maskray.data.views.BlockMask`: ``num_masked`` patches in blocks of at least ``min_block``, aspect
ratio in [min_aspect, 1 / min_aspect]) replaced by its mask token, and predicts the masked patches' codes with a
linear ``lm_head`` (cross-entropy). The patch-aggregation head concatenates the last block's CLS token with the
patch tokens of block ``early_layers`` (counted from 1, as the reference), runs ``head_layers`` extra blocks, the
encoder's final norm and the same ``lm_head``; its cross-entropy on the masked patches is added with weight 1, so
the CLS token has to summarise the image. The head is discarded after pre-training (the eval encoder is the
backbone). Layer scale, relative position bias and drop path are backbone settings (``model.*``); the paper's
gradient clipping is ``optim.clip_grad: 3.0``.

Decisions vs the reference: the aggregation head's blocks are built like the backbone's block at the same depth
(same drop-path rate, as the reference continues the schedule; same attention and layer-scale type), then
re-initialised as the reference does (trunc-normal 0.02, layer scale at ``model.layer_scale``, attention and MLP
output projections divided by sqrt(2 * layer id)). The tokenizer's image size and grid must equal the encoder's
(checked when the objective is built).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from timm.layers import trunc_normal_
from timm.models.beit import Beit

from maskray.context import StepContext
from maskray.errors import ConfigError
from maskray.models import MaskedViT
from maskray.objective import Objective, ObjectiveOutput, ObjectiveParams, register_objective
from maskray.passes import EncoderPass, MaskSpec, PassOutput
from maskray.teachers import FrozenTeacher
from objectives.vqkd import TokenizerSource, load_tokenizer


def aggregation_input(last: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
    """The patch-aggregation head's input: the CLS token of the last block's output ``last`` (B, 1+L, D) followed
    by the patch tokens of an earlier block's output ``early`` (B, 1+L, D) -> (B, 1+L, D)."""
    return torch.cat([last[:, :1], early[:, 1:]], dim=1)


def masked_token_loss(logits: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (M, K) at the masked patches, codes: (M,) their tokenizer codes -> (mean cross-entropy, accuracy)."""
    return F.cross_entropy(logits.float(), codes), (logits.argmax(-1) == codes).float().mean()


def reinit_block(block: nn.Module, layer_id: int, layer_scale: float | None) -> None:
    """BEiT's init of a transformer block at depth ``layer_id`` (from 1): Linear weights trunc-normal(0.02) and
    zero biases, norms reset, layer-scale factors at ``layer_scale``, attention / MLP output projections divided by
    sqrt(2 * layer_id)."""
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for name, param in block.named_parameters():
            if "gamma" in name:
                param.fill_(layer_scale if layer_scale is not None else 1.0)
            elif name.endswith(("q_bias", "v_bias", "relative_position_bias_table")):
                param.zero_()
        block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


class BEiTv2Params(ObjectiveParams):
    tokenizer: TokenizerSource = Field(description="the VQ-KD tokenizer: {run_id: <vqkd run>} or {path: <dir>}")
    num_masked: int = Field(26, gt=0, description="masked patches per image (~40%; paper: 75 of 196)")
    min_block: int = Field(5, gt=0, description="smallest mask block in patches (paper: 16 of 196)")
    min_aspect: float = Field(0.3, gt=0.0, le=1.0, description="block aspect ratios in [min_aspect, 1/min_aspect]")
    early_layers: int = Field(3, gt=0, description="the head reads this block's patch tokens (from 1; paper: 9)")
    head_layers: int = Field(2, gt=0, description="blocks of the patch-aggregation head")


@register_objective("beitv2")
class BEiTv2(Objective):
    Config = BEiTv2Params

    def __init__(self, encoder: MaskedViT, params: BEiTv2Params) -> None:
        super().__init__(encoder, params)
        tokenizer, source, sha256 = load_tokenizer(params.tokenizer)
        self.tokenizer = FrozenTeacher(tokenizer, source=source, sha256=sha256)
        encoder.add_mask_token()
        self.lm_head = nn.Linear(encoder.embed_dim, tokenizer.num_codes)
        trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        blocks = encoder.vit.blocks
        self.head = nn.ModuleList()
        for i in range(params.head_layers):
            depth = params.early_layers + i  # the reference's drop-path index of this head block
            block = copy.deepcopy(blocks[min(depth, len(blocks) - 1)])
            reinit_block(block, depth + 1, encoder.cfg.layer_scale)
            self.head.append(block)

    def check(self, model, data, where: str) -> None:
        encoder, tokenizer = self.encoder, self.tokenizer.module
        if self.params.early_layers > encoder.depth:
            raise ConfigError(f"key '{where}.early_layers': {self.params.early_layers} exceeds the encoder's "
                              f"{encoder.depth} blocks")
        if self.params.num_masked > encoder.num_patches:
            raise ConfigError(f"key '{where}.num_masked': {self.params.num_masked} exceeds the encoder's "
                              f"{encoder.num_patches} patches")
        size, own = tokenizer.encoder.cfg.img_size, encoder.cfg.img_size
        if (size, tokenizer.encoder.grid_size) != (own, encoder.grid_size):
            raise ConfigError(f"key '{where}.tokenizer': it codes {size}-pixel images on a "
                              f"{tokenizer.encoder.grid_size} grid, the encoder sees {own}-pixel images on a "
                              f"{encoder.grid_size} grid")

    def inputs(self, model, data):
        from maskray.data.transforms import ImageTransform
        from maskray.data.views import BlockMask, SharedCrop, Views

        grid = (model.img_size // model.patch_size,) * 2
        mask = BlockMask(grid, self.params.num_masked, self.params.min_block, min_aspect=self.params.min_aspect)
        return Views(crop=SharedCrop(ImageTransform.for_training(model, data)), mask=mask)

    def passes(self) -> dict[str, EncoderPass]:
        layers = (self.params.early_layers - 1, self.encoder.depth - 1)
        return {"masked": EncoderPass("crop.0", MaskSpec("batch", mode="replace", key="mask"), layers=layers)}

    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        """batch["crop"]: [normalised (B, C, H, W), pixels in [0, 1]]; batch["mask"]: (B, L), 1 = masked;
        outputs["masked"]: the encoder on the masked crop with the block outputs the head reads."""
        masked = outputs["masked"]
        where = masked.mask.bool()  # (B, L)
        codes = self.tokenizer(batch["crop"][1])[where]  # (M,)
        out = masked.out
        x = aggregation_input(out.layers[self.encoder.depth - 1], out.layers[self.params.early_layers - 1])
        vit = self.encoder.vit
        bias = vit.rel_pos_bias() if isinstance(vit, Beit) and vit.rel_pos_bias is not None else None
        for block in self.head:
            x = block(x, shared_rel_pos_bias=bias) if isinstance(vit, Beit) else block(x)
        aggregated = vit.norm(x)[:, 1:]  # the shared final norm (B, L, D)
        mim, mim_accuracy = masked_token_loss(self.lm_head(out.patches[where]), codes)
        agg, agg_accuracy = masked_token_loss(self.lm_head(aggregated[where]), codes)
        metrics = {"mim_loss": mim.detach(), "agg_loss": agg.detach(), "mim_accuracy": mim_accuracy,
                   "agg_accuracy": agg_accuracy, "mask_ratio": masked.mask.mean().detach()}
        return ObjectiveOutput(mim + agg, metrics)
