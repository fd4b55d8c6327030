"""MAE loss known values, loss only on masked patches, encoder shapes, plugin registry."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from maskray.config import load_config
from maskray.context import StepContext
from maskray.masking import masked_patch_loss, patchify
from maskray.models import build_encoder
from maskray.objective import OBJECTIVES, build_objective, get_objective


def test_zero_prediction_gives_unbiased_variance_ratio() -> None:
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    dim = 8 * 8 * 3
    mask = torch.ones(4, 16)
    loss = masked_patch_loss(torch.zeros(4, 16, dim), images, mask, 8, norm_pix=True)
    assert loss.item() == pytest.approx((dim - 1) / dim, rel=1e-5)


def test_loss_without_norm_pix_is_plain_mse_on_masked() -> None:
    images = torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 4, 48)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    target = patchify(images, 4)
    expected = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(masked_patch_loss(pred, images, mask, 4, norm_pix=False), expected)


def test_loss_ignores_visible_patches() -> None:
    torch.manual_seed(1)
    images = torch.randn(2, 3, 16, 16)
    mask = (torch.rand(2, 16) > 0.5).float()
    pred = torch.randn(2, 16, 48, requires_grad=True)
    loss = masked_patch_loss(pred, images, mask, 4)
    loss.backward()
    assert torch.all(pred.grad[mask == 0] == 0)
    assert torch.any(pred.grad[mask == 1] != 0)
    perturbed = pred.detach().clone()
    perturbed[mask == 0] += 100.0
    assert masked_patch_loss(perturbed, images, mask, 4).item() == pytest.approx(loss.item())


def test_encoder_drop_and_replace_shapes() -> None:
    config = load_config(None)
    encoder = build_encoder(config.model)
    images = torch.randn(2, 3, 16, 16)
    ids_keep = torch.stack([torch.randperm(16)[:4] for _ in range(2)])
    out = encoder(images, ids_keep=ids_keep, return_layers=(1,), return_attn=True)
    assert out.tokens.shape == (2, 5, 192)
    assert out.layers[1].shape == (2, 5, 192)
    assert out.attn[0].shape == (2, 3, 5, 5)
    torch.testing.assert_close(out.attn[0].sum(-1), torch.ones(2, 3, 5))
    replace = torch.zeros(2, 16)
    encoder.add_mask_token()
    full = encoder(images, replace_mask=replace).tokens
    torch.testing.assert_close(full, encoder(images).tokens)
    assert not encoder.vit.pos_embed.requires_grad


def test_mae_step_reduces_loss_on_fixed_batch() -> None:
    torch.manual_seed(0)
    config = load_config(None, ["objective.decoder_depth=1"])
    objective = build_objective("mae", config.objective.params, build_encoder(config.model))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    batch = {"image": torch.randn(8, 3, 16, 16)}

    def fixed_mask(step: int) -> StepContext:  # the same noise every step
        return StepContext(step, 60, generator=torch.Generator().manual_seed(0))

    first = objective(batch, fixed_mask(0)).loss.item()
    for step in range(60):
        loss = objective(batch, fixed_mask(step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_new_objective_registers_from_plugin_package(tmp_path, monkeypatch) -> None:
    package = tmp_path / "myplugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "zero.py").write_text(textwrap.dedent("""
        import torch
        from maskray.objective import Objective, ObjectiveOutput, register_objective

        @register_objective("zero")
        class Zero(Objective):
            def loss(self, batch, outputs, ctx):
                return ObjectiveOutput(loss=self.encoder(batch["image"]).tokens.mean() * 0)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MASKRAY_PLUGINS", "objectives,myplugins")
    try:
        config = load_config(None, ["objective.name=zero"])
        objective = build_objective("zero", config.objective.params, build_encoder(config.model))
        assert objective({"image": torch.randn(1, 3, 16, 16)}, StepContext(0, 1)).loss.item() == 0
        assert get_objective("mae").name == "mae"
    finally:
        OBJECTIVES.pop("zero", None)
        sys.modules.pop("myplugins.zero", None)
