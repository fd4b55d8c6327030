"""The k-NN protocol run during pretraining: features of the eval train split form the bank, the test
split queries it. Reported for the CLS token and for mean-pooled patch tokens."""

from __future__ import annotations

import torch

from maskray.config import DataConfig, EvalConfig, ModelConfig
from maskray.data import ImageTransform, ShardSet, resolve_shards
from maskray.errors import DataError
from maskray.eval.features import FEATURES, extract_features
from maskray.eval.knn import knn_accuracy
from maskray.models import MaskedViT


def eval_shard_sets(eval_config: EvalConfig) -> tuple[ShardSet, ShardSet] | None:
    """Resolve ``eval.train_shards`` / ``eval.test_shards`` (both labelled) or None when k-NN is off."""
    if not eval_config.train_shards or not eval_config.test_shards:
        return None
    sets = []
    for key, spec in (("eval.train_shards", eval_config.train_shards), ("eval.test_shards", eval_config.test_shards)):
        shard_set = resolve_shards(spec, key=key)
        if not shard_set.labelled:
            raise DataError(f"{key}: '{spec}' has no labels (write it from a folder with class subfolders)")
        sets.append(shard_set)
    return sets[0], sets[1]


def eval_transform(model: ModelConfig, data: DataConfig) -> ImageTransform:
    return ImageTransform(model.img_size, train=False, mean=data.mean, std=data.std, in_chans=model.in_chans)


def knn_metrics(
    encoder: MaskedViT,
    shard_sets: tuple[ShardSet, ShardSet],
    eval_config: EvalConfig,
    transform: ImageTransform,
    device: torch.device | str = "cpu",
    prefix: str = "knn",
) -> dict[str, float]:
    """``{f"{prefix}_top1": ..., f"{prefix}_top5": ...}`` for ``eval.feature``, plus per-feature entries
    ``{prefix}_top1_cls`` and ``{prefix}_top1_mean``."""
    train_set, test_set = shard_sets
    bank, bank_labels = extract_features(encoder, train_set, transform, eval_config.batch_size, device)
    queries, query_labels = extract_features(encoder, test_set, transform, eval_config.batch_size, device)
    num_classes = max(train_set.num_classes, int(bank_labels.max()) + 1)
    metrics: dict[str, float] = {}
    for feature in FEATURES:
        acc = knn_accuracy(
            bank[feature], bank_labels, queries[feature], query_labels, num_classes,
            eval_config.knn_k, eval_config.knn_temperature,
        )
        metrics[f"{prefix}_top1_{feature}"] = acc["top1"]
        if feature == eval_config.feature:
            metrics[f"{prefix}_top1"] = acc["top1"]
            metrics[f"{prefix}_top5"] = acc["top5"]
    return metrics
