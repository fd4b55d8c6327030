"""Masking invariants: random masking, block masking, patchify, gather-then-restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskray.masking import (
    block_mask,
    decoder_unshuffle,
    embed_visible_patches,
    num_visible,
    patchify,
    random_mask_indices,
    unpatchify,
)
from maskray.masking.reference import gather_tokens
from maskray.models import sincos_2d


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.75, 0.9, 0.95])
@pytest.mark.parametrize("length", [16, 49, 196])
def test_random_masking_partitions_and_inverts(ratio: float, length: int) -> None:
    torch.manual_seed(0)
    noise = torch.rand(5, length)
    keep = num_visible(length, ratio)
    assert keep == int(length * (1 - ratio))
    masking = random_mask_indices(noise, keep)
    assert masking.ids_keep.shape == (5, keep)
    for b in range(5):
        kept = set(masking.ids_keep[b].tolist())
        masked = set(torch.nonzero(masking.mask[b]).flatten().tolist())
        assert len(kept) == keep and kept.isdisjoint(masked) and kept | masked == set(range(length))
    assert torch.all(masking.mask.sum(1) == length - keep)
    shuffle = torch.argsort(noise, dim=1, stable=True)
    assert torch.equal(torch.gather(shuffle, 1, masking.ids_restore), torch.arange(length).expand(5, -1))
    assert torch.equal(masking.ids_keep, shuffle[:, :keep])


def test_ties_follow_stable_argsort() -> None:
    noise = torch.tensor([[0.5, 0.1, 0.5, 0.1, 0.3]])
    masking = random_mask_indices(noise, 3)
    assert masking.ids_keep.tolist() == [[1, 3, 4]]


def test_gather_then_restore_reproduces_input() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 1 + 20, 8)
    masking = random_mask_indices(torch.rand(3, 20), 7)
    visible = torch.cat([x[:, :1], gather_tokens(x[:, 1:], masking.ids_keep)], dim=1)
    restored = decoder_unshuffle(visible, masking.ids_restore, torch.zeros(1, 1, 8), torch.zeros(1, 21, 8))
    keep_rows = masking.mask == 0
    assert torch.equal(restored[:, 0], x[:, 0])
    assert torch.equal(restored[:, 1:][keep_rows], x[:, 1:][keep_rows])
    assert torch.all(restored[:, 1:][~keep_rows] == 0)


def test_visible_embedding_matches_full_conv_then_gather() -> None:
    torch.manual_seed(2)
    images = torch.randn(2, 3, 16, 24)
    conv = torch.nn.Conv2d(3, 32, 4, 4)
    pos = sincos_2d(32, (4, 6))
    cls = torch.randn(1, 1, 32)
    masking = random_mask_indices(torch.rand(2, 24), 6)
    full = conv(images).flatten(2).transpose(1, 2) + pos[:, 1:]
    expected = torch.cat([(cls + pos[:, :1]).expand(2, -1, -1), gather_tokens(full, masking.ids_keep)], 1)
    got = embed_visible_patches(images, masking.ids_keep, conv.weight, conv.bias, pos, cls)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_patchify_round_trip_and_order() -> None:
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    assert torch.equal(unpatchify(patches, 4, (2, 3), 3), images)
    # (p, q, c) order: channel fastest; second patch is columns 4..7 of rows 0..3
    assert torch.equal(patches[0, 1, :3], images[0, :, 0, 4])


@pytest.mark.parametrize("seed", range(5))
def test_block_mask_exact_count_and_blocks(seed: int) -> None:
    mask = block_mask((14, 14), 75, np.random.default_rng(seed))
    assert mask.shape == (14, 14) and mask.sum() == 75 and set(np.unique(mask)) <= {0, 1}


def test_sincos_cls_slot_and_distinct_rows() -> None:
    table = sincos_2d(16, (3, 5))
    assert table.shape == (1, 16, 16)
    assert torch.all(table[0, 0] == 0)
    assert torch.unique(table[0, 1:], dim=0).shape[0] == 15
