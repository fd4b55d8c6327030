"""Backbone options of MaskedViT: one forward for drop / replace masking, layers and attention maps on timm ViT and
Beit archs, the encoder-owned mask token, views of another size, layer scale, relative position bias, weight-decay
names, strict timm export, and a single-process DeepSpeed ZeRO-3 step."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskray.config import load_config
from maskray.errors import ConfigError
from maskray.masking import masked_patch_loss, num_visible, random_mask_indices
from maskray.models import (
    MAEDecoder,
    MaskedViT,
    MaskedViTCfg,
    attention_probs,
    build_encoder,
    register_external_parameters,
)

VIT = "vit_tiny_patch16_224"
BEIT = "beitv2_base_patch16_224"
# (arch, MaskedViT options): a plain ViT, a Beit with absolute positions only, a Beit with both relative biases
BACKBONES = [
    pytest.param(VIT, {}, id="vit"),
    pytest.param(BEIT, {}, id="beit-abs"),
    pytest.param(BEIT, {"rel_pos_bias": "both", "pos_embed": "none", "layer_scale": 0.1}, id="beit-rel"),
]


def _tiny(arch: str = VIT, **options) -> MaskedViT:
    """img 16, patch 4 (a 4x4 grid), two blocks."""
    torch.manual_seed(0)
    return MaskedViT(MaskedViTCfg(arch=arch, img_size=16, patch_size=4, depth=2, **options)).eval()


def _randomize_rel_pos_tables(encoder: MaskedViT) -> None:
    """timm zero-initialises the relative position bias tables; give them values so that they matter."""
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_(std=0.5)


def _ids_keep(batch: int, length: int, keep: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.stack([torch.randperm(length, generator=generator)[:keep] for _ in range(batch)])


@pytest.mark.parametrize(("arch", "options"), BACKBONES)
def test_forward_shapes_for_drop_replace_layers_and_attn(arch, options) -> None:
    encoder = _tiny(arch, **options)
    width, heads = encoder.embed_dim, encoder.vit.blocks[0].attn.num_heads
    images = torch.randn(2, 3, 16, 16)
    encoder.add_mask_token()
    replace = (torch.rand(2, 16) > 0.5).float()
    out = encoder(images, replace_mask=replace, return_layers=(0, 1), return_attn=True)
    assert out.tokens.shape == (2, 17, width) and out.cls.shape == (2, width) and out.patches.shape == (2, 16, width)
    assert set(out.layers) == {0, 1} and out.layers[1].shape == (2, 17, width)
    assert set(out.attn) == {0, 1} and out.attn[0].shape == (2, heads, 17, 17)
    torch.testing.assert_close(out.attn[1].sum(-1), torch.ones(2, heads, 17))
    if encoder.has_rel_pos_bias:
        with pytest.raises(ValueError, match="relative position bias covers the full grid"):
            encoder(images, ids_keep=_ids_keep(2, 16, 4))
        return
    dropped = encoder(images, ids_keep=_ids_keep(2, 16, 4), return_layers=(1,), return_attn=True)
    assert dropped.tokens.shape == (2, 5, width) and dropped.layers[1].shape == (2, 5, width)
    assert dropped.attn[0].shape == (2, heads, 5, 5)
    with pytest.raises(ValueError, match="return_layers"):
        encoder(images, return_layers=(2,))


@pytest.mark.parametrize(("arch", "options"), BACKBONES)
def test_attention_probs_reproduce_the_attention_output(arch, options) -> None:
    """softmax(A) @ V through the output projection equals the module's own forward (Beit: with both biases)."""
    encoder = _tiny(arch, **options)
    _randomize_rel_pos_tables(encoder)
    block = encoder.vit.blocks[1]
    attn = block.attn
    x = block.norm1(torch.randn(2, 17, encoder.embed_dim))
    shared = encoder.vit.rel_pos_bias() if getattr(encoder.vit, "rel_pos_bias", None) is not None else None
    probs = attention_probs(attn, x, shared)
    if hasattr(attn, "q_bias"):  # Beit attention
        qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        expected = attn(x, shared_rel_pos_bias=shared)
    else:
        qkv = attn.qkv(x)
        expected = attn(x)
    v = qkv.reshape(2, 17, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
    mixed = (probs @ v).transpose(1, 2).reshape(2, 17, -1)
    torch.testing.assert_close(attn.proj(mixed), expected, atol=1e-5, rtol=1e-5)


def test_mask_token_is_created_once_and_not_exported() -> None:
    encoder = _tiny()
    assert encoder.mask_token is None and "mask_token" not in dict(encoder.named_parameters())
    token = encoder.add_mask_token()
    assert token.shape == (1, 1, encoder.embed_dim) and token.requires_grad
    assert 0.01 < token.std().item() < 0.03
    assert encoder.add_mask_token() is token and encoder.mask_token is token
    assert dict(encoder.named_parameters())["mask_token"] is token
    assert not any("mask_token" in key for key in encoder.timm_state_dict())
    with pytest.raises(ValueError, match="add_mask_token"):
        _tiny()(torch.randn(1, 3, 16, 16), replace_mask=torch.zeros(1, 16))


@pytest.mark.parametrize(("arch", "options"), BACKBONES)
def test_replace_with_an_empty_mask_equals_the_unmasked_forward(arch, options) -> None:
    encoder = _tiny(arch, **options)
    encoder.add_mask_token()
    images = torch.randn(2, 3, 16, 16)
    plain = encoder(images).tokens
    torch.testing.assert_close(encoder(images, replace_mask=torch.zeros(2, 16)).tokens, plain, atol=1e-5, rtol=1e-5)
    mask = torch.zeros(2, 16)
    mask[:, 3] = 1
    masked = encoder(images, replace_mask=mask).tokens
    assert not torch.allclose(masked, plain, atol=1e-3)
    # the mask token replaces the patch: the masked image content no longer matters
    changed = images.clone()
    changed[:, :, 0:4, 12:16] += 5.0  # patch 3 of the row-major 4x4 grid
    torch.testing.assert_close(encoder(changed, replace_mask=mask).tokens, masked)


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_a_smaller_view_gets_the_resampled_position_embedding(pos_embed) -> None:
    encoder = _tiny(pos_embed=pos_embed)
    encoder.add_mask_token()
    table = encoder.vit.pos_embed
    assert encoder.pos_embed_for(encoder.grid_size) is table  # the model's own size: the table itself
    resampled = encoder.pos_embed_for((2, 2))
    assert resampled.shape == (1, 5, encoder.embed_dim)
    torch.testing.assert_close(resampled[:, 0], table[:, 0])  # CLS slot kept
    view = torch.randn(3, 3, 8, 8)
    tokens = encoder(view).tokens
    assert tokens.shape == (3, 5, encoder.embed_dim)
    reference = timm.create_model(VIT, num_classes=0, dynamic_img_size=True, **encoder.timm_kwargs).eval()
    reference.load_state_dict(encoder.timm_state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(tokens, reference.forward_features(view), atol=1e-5, rtol=1e-5)
    # replace path and drop path (ids_keep on the view's own 2x2 grid) agree with the full pass on the view
    torch.testing.assert_close(encoder(view, replace_mask=torch.zeros(3, 4)).tokens, tokens, atol=1e-5, rtol=1e-5)
    ids_keep = torch.arange(4).expand(3, 4)
    torch.testing.assert_close(encoder(view, ids_keep=ids_keep).tokens, tokens, atol=1e-5, rtol=1e-5)
    assert encoder(view, ids_keep=_ids_keep(3, 4, 2)).tokens.shape == (3, 3, encoder.embed_dim)
    with pytest.raises(ValueError, match="not divisible"):
        encoder(torch.randn(1, 3, 10, 10))


def test_the_resampled_position_embedding_is_trained() -> None:
    encoder = _tiny(pos_embed="learned")
    encoder(torch.randn(2, 3, 8, 8), ids_keep=_ids_keep(2, 4, 3)).tokens.sum().backward()
    assert encoder.vit.pos_embed.grad is not None and encoder.vit.pos_embed.grad[:, 1:].abs().sum() > 0


def test_relative_position_bias_needs_the_full_grid() -> None:
    encoder = _tiny(BEIT, rel_pos_bias="shared")
    encoder.add_mask_token()
    with pytest.raises(ValueError, match="sized for the"):
        encoder(torch.randn(1, 3, 8, 8), replace_mask=torch.zeros(1, 4))


def test_layer_scale_and_drop_path_reach_the_blocks() -> None:
    vit = _tiny(layer_scale=0.1, drop_path_rate=0.2)
    beit = _tiny(BEIT, layer_scale=1e-5, drop_path_rate=0.2)
    for block in vit.vit.blocks:
        assert torch.all(block.ls1.gamma == 0.1) and torch.all(block.ls2.gamma == 0.1)
    for block in beit.vit.blocks:
        assert torch.all(block.gamma_1 == 1e-5) and torch.all(block.gamma_2 == 1e-5)
    for encoder in (vit, beit):
        assert encoder.vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # timm's linear decay, last block
    assert not any("gamma" in name for name, _ in _tiny(BEIT).named_parameters())  # null: no LayerScale
    assert isinstance(_tiny().vit.blocks[0].ls1, nn.Identity)


@pytest.mark.parametrize(("arch", "options"), [*BACKBONES, pytest.param(BEIT, {"rel_pos_bias": "shared"}, id="shared")])
def test_exported_state_dict_loads_strictly_into_timm(arch, options) -> None:
    encoder = _tiny(arch, **options)
    _randomize_rel_pos_tables(encoder)
    encoder.add_mask_token()
    model = timm.create_model(arch, num_classes=0, **encoder.timm_kwargs).eval()
    model.load_state_dict(encoder.timm_state_dict(), strict=True)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), encoder(images).tokens, atol=1e-5, rtol=1e-5)


def test_no_weight_decay_names_come_from_timm_and_exist() -> None:
    for encoder in (_tiny(), _tiny(BEIT, rel_pos_bias="both", pos_embed="none")):
        encoder.add_mask_token()
        names = encoder.no_weight_decay()
        assert names <= set(dict(encoder.named_parameters()))
        assert {"vit.cls_token", "mask_token"} <= names
    assert "vit.pos_embed" in _tiny().no_weight_decay()
    tables = {name for name in names if "relative_position_bias_table" in name}
    blocks = {f"vit.blocks.{index}.attn.relative_position_bias_table" for index in range(2)}
    assert tables == {"vit.rel_pos_bias.relative_position_bias_table", *blocks}


def test_config_validates_and_builds_the_backbone_options() -> None:
    with pytest.raises(ConfigError, match="model.rel_pos_bias"):
        load_config(None, ["model.rel_pos_bias=shared"])
    with pytest.raises(ConfigError, match="model.rel_pos_bias': .*pos_embed 'none' needs a relative position bias"):
        load_config(None, [f"model.arch={BEIT}", "model.pos_embed=none"])
    with pytest.raises(ValueError, match="Beit arch"):
        MaskedViT(MaskedViTCfg(arch=VIT, img_size=16, patch_size=4, depth=1, rel_pos_bias="per_block"))
    config = load_config(None, [f"model.arch={BEIT}", "model.depth=1", "model.rel_pos_bias=shared",
                                "model.layer_scale=0.1", "model.drop_path_rate=0.1"])
    encoder = build_encoder(config.model)
    assert encoder.timm_kwargs == dict(img_size=16, patch_size=4, in_chans=3, init_values=0.1, depth=1,
                                       use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                       use_fc_norm=False)
    assert encoder.vit.rel_pos_bias is not None and not encoder.vit.pos_embed.requires_grad  # sin-cos default


# ---------------------------------------------------------------------------------------------------------- ZeRO-3


class _MAE(nn.Module):
    """MaskedViT + MAEDecoder returning the loss as a tensor (a fixed mask from ``noise``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = MaskedViT(MaskedViTCfg(arch=VIT, img_size=16, patch_size=4, depth=2, pos_embed="learned"))
        self.decoder = MAEDecoder(self.encoder.embed_dim, self.encoder.grid_size, 4 * 4 * 3, dim=32, depth=1,
                                  num_heads=2)

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        masking = random_mask_indices(noise, num_visible(16, 0.75))
        latent = self.encoder(images, ids_keep=masking.ids_keep).tokens
        return masked_patch_loss(self.decoder(latent, masking.ids_restore), images, masking.mask, 4)


class _BeitReplace(nn.Module):
    """A Beit MaskedViT (both relative biases, no absolute positions) on the replace path, attention maps included,
    with a linear head: a loss that reaches the mask token, the bias tables and the attention weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = MaskedViT(MaskedViTCfg(arch=BEIT, img_size=16, patch_size=4, depth=2, pos_embed="none",
                                              rel_pos_bias="both", layer_scale=0.1))
        self.encoder.add_mask_token()
        self.head = nn.Linear(self.encoder.embed_dim, 8)

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.encoder(images, replace_mask=(noise > 0.5).float(), return_attn=True)
        return self.head(out.patches).pow(2).mean() + out.attn[1].pow(2).mean()


def _train(deepspeed, model: nn.Module, stage: int, steps: int = 3) -> list[float]:
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter, however small
    config = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 4, "zero_optimization": zero,
              "steps_per_print": 1 << 30}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(0)
    images, noise = torch.randn(4, 3, 16, 16, generator=generator), torch.rand(4, 16, generator=generator)
    losses = []
    for _ in range(steps):
        loss = engine(images, noise)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("module", [_MAE, _BeitReplace], ids=["vit-drop", "beit-replace"])
def test_zero3_trains_like_stage_0(process_group, module) -> None:
    """Stage 3 with every parameter partitioned: forward / backward / step work and match stage 0 in fp32.

    (The first backward failed with "The size of tensor a (0) must match the size of tensor b (192)" while the
    encoder returned a dataclass, which hid its tensors from DeepSpeed's pre-backward hook.)
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    model = module()
    baseline = _train(process_group, copy.deepcopy(model), stage=0)
    assert register_external_parameters(model) == len(model.encoder.external_parameters())
    losses = _train(process_group, model, stage=3)
    assert model.encoder.vit.cls_token.ds_status == ZeroParamStatus.NOT_AVAILABLE  # partitioned between steps
    registered = set(model.encoder._external_params)  # registration made before initialize survives it
    assert {id(p) for p in model.encoder.external_parameters()} <= registered
    assert losses == pytest.approx(baseline, rel=1e-5)
    assert losses[1] != losses[0]  # the steps changed the weights
