"""Fine-tuning evaluation: layer-wise lr decay groups, learning on a trivial task, determinism, the encoder copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import png_bytes

from maskray.config import load_config
from maskray.data import ImageTransform, Sample, ShardSet, write_shards
from maskray.eval.finetune import FinetuneClassifier, FinetuneConfig, finetune, layer_id, param_groups
from maskray.models import build_encoder

FAST = FinetuneConfig(epochs=6, warmup_epochs=1, batch_size=16, blr=0.02)


def _two_classes(directory: Path, per_class: int, seed: int) -> ShardSet:
    """Class 0: noisy images, dark on the left half; class 1: dark on the right half (20x20 RGB)."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(2 * per_class):
        label = index % 2
        pixels = rng.normal(200, 15, (20, 20, 3))
        pixels[:, :10] -= 150 * (1 - label)
        pixels[:, 10:] -= 150 * label
        samples.append(Sample(f"s{index:04d}", image=png_bytes(np.clip(pixels, 0, 255).astype(np.uint8)), ext="png",
                              label=label))
    return write_shards(samples, directory, samples_per_shard=32, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    config = load_config(None)
    shard_sets = (_two_classes(root / "train", 24, 0), _two_classes(root / "test", 10, 1))
    model = config.model
    transforms = (
        ImageTransform(model.img_size, train=True, crop_scale=(0.6, 1.0), hflip=False, mean=config.data.mean,
                       std=config.data.std, in_chans=model.in_chans),
        ImageTransform(model.img_size, train=False, mean=config.data.mean, std=config.data.std,
                       in_chans=model.in_chans),
    )
    torch.manual_seed(0)
    return build_encoder(model), shard_sets, transforms


def test_layer_ids_follow_mae() -> None:
    assert layer_id("cls_token", 5) == layer_id("pos_embed", 5) == layer_id("patch_embed.proj.weight", 5) == 0
    assert layer_id("blocks.0.attn.qkv.weight", 5) == 1
    assert layer_id("blocks.3.mlp.fc2.bias", 5) == 4
    assert layer_id("norm.weight", 5) == layer_id("head.weight", 5) == 5


def test_param_groups_decay_lr_by_layer(setup) -> None:
    encoder = setup[0]
    model = FinetuneClassifier(encoder, num_classes=2, drop_path=0.1)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {name: group["lr_scale"] for group in groups for name in group["names"]}
    decay = {name: group["weight_decay"] for group in groups for name in group["names"]}
    depth = encoder.depth  # 4: num_layers 5
    assert scale["vit.cls_token"] == scale["vit.patch_embed.proj.weight"] == 0.5 ** (depth + 1)
    for block in range(depth):
        assert scale[f"vit.blocks.{block}.attn.qkv.weight"] == 0.5 ** (depth - block)
    assert scale["vit.norm.weight"] == scale["head.weight"] == scale["head.bias"] == 1.0
    assert "vit.pos_embed" not in scale  # fixed sin-cos: frozen
    assert decay["head.weight"] == decay["vit.blocks.0.mlp.fc1.weight"] == 0.05
    assert decay["head.bias"] == decay["vit.norm.weight"] == decay["vit.cls_token"] == 0.0
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert len(scale) == len(trainable)


def test_finetune_learns_and_is_deterministic(setup) -> None:
    encoder, shard_sets, (train, test) = setup
    before = {key: value.clone() for key, value in encoder.state_dict().items()}
    first = finetune(encoder, shard_sets, 2, train, test, FAST)
    assert first["top1"] == 100.0 and first["top5"] == 100.0
    assert all(torch.equal(value, before[key]) for key, value in encoder.state_dict().items())
    assert finetune(encoder, shard_sets, 2, train, test, FAST) == first


def test_low_label_finetune_uses_a_seeded_subset(setup) -> None:
    encoder, shard_sets, (train, test) = setup
    config = FinetuneConfig(epochs=8, warmup_epochs=1, batch_size=8, blr=0.02, labels_per_class=4, seed=3)
    result = finetune(encoder, shard_sets, 2, train, test, config)
    assert result["top1"] > 75.0
    assert finetune(encoder, shard_sets, 2, train, test, config) == result
