"""The k-NN protocol run during pretraining: features of the eval train split form the bank, the test
split queries it. Reported for the CLS token and for mean-pooled patch tokens."""

from __future__ import annotations

import torch

from maskray.config import Config, EvalConfig
from maskray.data import ImageTransform, ShardSet, resolve_shards
from maskray.errors import DataError
from maskray.eval.features import FEATURES, extract_features
from maskray.eval.knn import knn_accuracy
from maskray.models import MaskedViT


def eval_shard_sets(eval_config: EvalConfig) -> tuple[ShardSet, ShardSet] | None:
    """Resolve ``eval.train_shards`` / ``eval.test_shards`` (both labelled) or None when k-NN is off."""
    if not eval_config.knn_enabled:
        return None
    sets = []
    for key, spec in (("eval.train_shards", eval_config.train_shards), ("eval.test_shards", eval_config.test_shards)):
        shard_set = resolve_shards(spec, key=key)
        if not shard_set.labelled:
            raise DataError(f"{key}: '{spec}' has no labels (write it from a folder with class subfolders)")
        sets.append(shard_set)
    return sets[0], sets[1]


Features = tuple[dict[str, torch.Tensor], torch.Tensor]  # ({"cls": (N, D), "mean": (N, D)}, labels (N,))


def split_features(
    encoder: MaskedViT, shard_sets: tuple[ShardSet, ShardSet], config: Config, device: torch.device | str = "cpu"
) -> tuple[Features, Features]:
    """Frozen features of the eval train split (the bank) and test split (the queries), eval transform."""
    transform = ImageTransform.for_eval(config.model, config.data)
    return tuple(extract_features(encoder, shards, transform, config.eval.batch_size, device) for shards in shard_sets)


def num_classes(shard_sets: tuple[ShardSet, ShardSet], train: Features) -> int:
    return max(shard_sets[0].num_classes, int(train[1].max()) + 1)


def knn_metrics(
    train: Features, test: Features, num_classes: int, eval_config: EvalConfig, prefix: str = "knn"
) -> dict[str, float]:
    """``{f"{prefix}_top1": ..., f"{prefix}_top5": ...}`` for ``eval.feature``, plus per-feature entries
    ``{prefix}_top1_cls`` and ``{prefix}_top1_mean``."""
    (bank, bank_labels), (queries, query_labels) = train, test
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


def encoder_knn_metrics(
    encoder: MaskedViT, shard_sets: tuple[ShardSet, ShardSet], config: Config, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Extract the features of both splits with ``encoder`` and run :func:`knn_metrics`."""
    train, test = split_features(encoder, shard_sets, config, device)
    return knn_metrics(train, test, num_classes(shard_sets, train), config.eval)
