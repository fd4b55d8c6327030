"""SimMIM: the masked L1 loss (known values, visible pixels ignored), the 2x2-block mask, the mask-token pass."""

from __future__ import annotations

import pytest
import torch

from maskray.config import load_config
from maskray.context import StepContext
from maskray.errors import ConfigError
from maskray.models import build_encoder
from maskray.objective import build_objective
from objectives.simmim import PixelHead, masked_l1_loss, pixel_mask

GEOMETRY = ["model.img_size=32", "model.patch_size=4", "objective.name=simmim"]


def simmim(*overrides: str):
    torch.manual_seed(0)
    config = load_config(None, [*GEOMETRY, *overrides])
    return config, build_objective("simmim", config.objective.params, build_encoder(config.model))


def test_loss_hand_computed_on_a_tiny_tensor() -> None:
    """2x2 image of two channels, patch 1, pixels (0,0) and (1,1) masked: |errors| there are 1, 3 (channel 0) and
    2, 6 (channel 1), so the loss is 12 / (2 + 1e-5) / 2."""
    images = torch.zeros(1, 2, 2, 2)
    reconstruction = torch.tensor([[[[1.0, 50.0], [-70.0, -3.0]], [[2.0, 90.0], [11.0, 6.0]]]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    loss = masked_l1_loss(reconstruction, images, mask, patch=1)
    assert loss.item() == pytest.approx(12.0 / (2 + 1e-5) / 2, rel=1e-6)


def test_loss_matches_the_reference_formula() -> None:
    torch.manual_seed(1)
    images, reconstruction = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    mask = (torch.rand(3, 4) > 0.5).float()
    pixels = mask.reshape(3, 2, 2).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    expected = ((images - reconstruction).abs() * pixels).sum() / (pixels.sum() + 1e-5) / 3
    torch.testing.assert_close(masked_l1_loss(reconstruction, images, mask, patch=4), expected)


def test_loss_ignores_visible_pixels() -> None:
    torch.manual_seed(2)
    images = torch.randn(2, 3, 8, 8)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    reconstruction = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = masked_l1_loss(reconstruction, images, mask, patch=4)
    loss.backward()
    visible = pixel_mask(mask, (2, 2), 4).expand_as(images) == 0
    assert torch.all(reconstruction.grad[visible] == 0) and torch.all(reconstruction.grad[~visible] != 0)
    perturbed = reconstruction.detach().clone()
    perturbed[visible] += 100.0
    assert masked_l1_loss(perturbed, images, mask, patch=4).item() == pytest.approx(loss.item())


def test_loss_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="equal"):
        masked_l1_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4), torch.zeros(1, 4), patch=4)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        masked_l1_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1, 5), patch=4)


def test_mask_view_has_the_exact_count_in_2x2_blocks() -> None:
    config, objective = simmim()
    entry = objective.inputs(config.model, config.data).entries[objective.MASK]
    torch.manual_seed(3)
    masks = torch.stack([entry(None) for _ in range(20)])  # (20, 64) over the 8x8 grid
    assert masks.shape == (20, 64)
    assert torch.all(masks.sum(1) == 4 * 10)  # ceil(16 squares * 0.6) = 10 squares of 4 patches
    squares = masks.reshape(20, 4, 2, 4, 2)  # (sample, square row, row in square, square col, col in square)
    assert torch.all(squares.amin(dim=(2, 4)) == squares.amax(dim=(2, 4)))  # each 2x2 square all or nothing
    assert len({tuple(m.tolist()) for m in masks}) > 1


def test_mask_block_must_tile_the_grid() -> None:
    config, objective = simmim("objective.mask_block=3")
    with pytest.raises(ConfigError, match="objective.mask_block"):
        objective.check(config.model, config.data, "objective")


def test_mask_token_replaces_exactly_the_masked_positions() -> None:
    _, objective = simmim()
    encoder = objective.encoder
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64)
    mask[0, [0, 1, 8, 9]] = 1
    mask[1, 63] = 1
    embedded = encoder.embed(images, replace_mask=mask)[:, 1:]  # (B, L, D) after position embedding
    plain = encoder.embed(images)[:, 1:]
    position = encoder.pos_embed_for(encoder.grid_size)[:, 1:]
    hidden = mask.bool()
    torch.testing.assert_close(embedded[~hidden], plain[~hidden])
    token_plus_position = (encoder.mask_token + position).expand(2, -1, -1)
    torch.testing.assert_close(embedded[hidden], token_plus_position[hidden])


def test_pixel_head_is_conv_then_pixel_shuffle() -> None:
    torch.manual_seed(4)
    head = PixelHead(dim=5, patch=2, in_chans=3, grid=(2, 3))
    patches = torch.randn(1, 6, 5)
    out = head(patches)
    assert out.shape == (1, 3, 4, 6)
    # pixel (row 2 + 1, col 2 * 2 + 0) of channel c comes from patch (1, 2), conv channel c * 4 + 1 * 2 + 0
    token = patches[0, 1 * 3 + 2]
    for channel in range(3):
        index = channel * 4 + 2
        expected = head.proj.weight[index, :, 0, 0] @ token + head.proj.bias[index]
        assert out[0, channel, 3, 4].item() == pytest.approx(expected.item(), rel=1e-5)


def test_step_runs_one_replace_pass_and_learns_a_fixed_batch() -> None:
    config, objective = simmim()
    entry = objective.inputs(config.model, config.data).entries[objective.MASK]
    images = torch.randn(4, 3, 1, 1).expand(-1, -1, 32, 32)  # one colour per image: masked pixels are predictable
    batch = {objective.IMAGE: images, objective.MASK: torch.stack([entry(None) for _ in range(4)])}
    assert list(objective.passes().values())[0].mask.mode == "replace"
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    first = objective(batch, StepContext(0, 30)).loss.item()
    for step in range(30):
        out = objective(batch, StepContext(step, 30))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.metrics["mask_ratio"].item() == pytest.approx(40 / 64)
    assert objective.encoder.mask_token.grad is not None
    assert out.loss.item() < 0.5 * first
    assert "reconstructions.png" in objective.figures(batch)
