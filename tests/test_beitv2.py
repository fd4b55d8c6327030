"""BEiT v2: aggregation-head input, initial loss ~ 2 ln K, loader views (shared crop, block mask), tokenizer grid
check, a short single-process training that lowers the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import demo_digits, png_bytes, tiny_tokenizer

from maskray.config import load_config
from maskray.context import StepContext
from maskray.data.sample import DecodedSample
from maskray.errors import ConfigError
from maskray.masking.block import block_mask
from maskray.models import build_encoder
from maskray.objective import build_objective
from objectives.beitv2 import aggregation_input


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tok", img_size=16, num_codes=16)


def beitv2(tokenizer, *overrides: str):
    config = load_config(None, ["model.img_size=16", "model.depth=2", "model.layer_scale=0.1",
                                "objective.name=beitv2", f"objective.tokenizer.path={tokenizer}",
                                "objective.num_masked=6", "objective.min_block=2", "objective.early_layers=1",
                                *overrides])
    torch.manual_seed(0)
    return build_objective("beitv2", config.objective.params, build_encoder(config.model)), config


def batch_of(pixels: torch.Tensor, num_masked: int = 6) -> dict:
    rng = np.random.default_rng(0)
    grid = (pixels.shape[-1] // 4,) * 2
    mask = np.stack([block_mask(grid, num_masked, rng, 2).reshape(-1) for _ in range(len(pixels))])
    return {"crop": [(pixels - 0.5) / 0.5, pixels], "mask": torch.from_numpy(mask)}


def test_aggregation_input_is_last_cls_then_early_patches() -> None:
    last, early = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    x = aggregation_input(last, early)
    assert torch.equal(x[:, 0], last[:, 0]) and torch.equal(x[:, 1:], early[:, 1:])


def test_initial_loss_is_twice_log_vocabulary(tokenizer, one_thread) -> None:
    objective, _ = beitv2(tokenizer)
    out = objective(batch_of(demo_digits(16, 16)), StepContext(0, 1))
    assert out.loss.item() == pytest.approx(2 * math.log(16), abs=0.15)
    assert out.metrics["mask_ratio"].item() == pytest.approx(6 / 16)


def test_views_share_one_crop_and_mask_exactly(tokenizer) -> None:
    objective, config = beitv2(tokenizer)
    views = objective.inputs(config.model, config.data)
    pixels = (np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)
    sample = DecodedSample("k", 0, "demo.tar", {"png": png_bytes(pixels)})
    out = views(sample)
    normalised, raw = out["crop"]
    torch.testing.assert_close(normalised, (raw - 0.5) / 0.5)
    assert raw.min() >= 0 and raw.max() <= 1 and out["mask"].shape == (16,) and int(out["mask"].sum()) == 6


def test_tokenizer_grid_must_match_the_encoder(tokenizer) -> None:
    objective, config = beitv2(tokenizer, "model.img_size=32")
    with pytest.raises(ConfigError, match="key 'objective.tokenizer': .*grid"):
        objective.check(config.model, config.data, "objective")


def test_short_training_lowers_the_loss(tokenizer, one_thread) -> None:
    objective, _ = beitv2(tokenizer)
    images = demo_digits(16, 128)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(15):
        pixels = images[torch.randint(0, len(images), (16,), generator=generator)]
        out = objective(batch_of(pixels), StepContext(step, 15, generator=generator))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3
    assert all(p.grad is not None for p in objective.head.parameters() if p.requires_grad)


def test_beit_backbone_with_shared_relative_position_bias(tmp_path, one_thread) -> None:
    """The paper's backbone kind (timm Beit, no absolute positions, one shared relative position bias, layer scale):
    the head blocks are Beit blocks that take the shared bias, re-initialised with layer scale 0.1."""
    tokenizer = tiny_tokenizer(tmp_path / "tok", img_size=16, num_codes=16)
    objective, _ = beitv2(tokenizer, "model.arch=beitv2_base_patch16_224", "model.pos_embed=none",
                          "model.rel_pos_bias=shared", "model.depth=2", "objective.early_layers=1")
    assert all(torch.all(block.gamma_1 == 0.1) for block in objective.head)
    out = objective(batch_of(demo_digits(16, 4)), StepContext(0, 1))
    out.loss.backward()
    assert objective.encoder.vit.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0
    assert out.loss.item() == pytest.approx(2 * math.log(16), abs=0.3)
