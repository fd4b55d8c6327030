"""Linear probe on frozen features: MAE's head and schedule (``main_linprobe.py``), trained with SGD.

Head (exactly MAE's): ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, C)`` with the weight drawn
from trunc_normal(std=0.01) and a zero bias. The BN has no affine parameters, so the head stays linear.

Optimiser (a documented deviation): **SGD, momentum 0.9, weight decay 0**. MAE uses LARS because its effective
batch is 16384 (512 x 32 GPUs); at the batch sizes of an evaluation on one machine (256 here) the layer-wise
trust ratio of LARS brings nothing, and SGD with momentum 0.9 is the linear-probe optimiser of DINO and MoCo v3.
Schedule as MAE: ``lr = blr * batch / 256`` (blr 0.1), linear warmup for ``warmup_epochs`` then half-cycle cosine
to 0, set every iteration; 90 epochs with 10 warmup epochs; the last incomplete batch is dropped.

Features are extracted once with the eval transform (no augmentation: the probe solves the same convex problem
as MAE's, without RandomResizedCrop), so a probe on ~2k samples takes a second on a CPU. Everything random
(initialisation, batch order) comes from one ``torch.Generator`` seeded with ``seed``: the result is
deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskray.eval.features import FEATURES
from maskray.schedules import warmup_cosine


@dataclass(frozen=True)
class LinearProbeConfig:
    """MAE linear-probe hyperparameters (``blr`` and epochs from ``main_linprobe.py``)."""

    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 256
    blr: float = 0.1
    momentum: float = 0.9
    seed: int = 0


def probe_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    """MAE's probe head: BN without affine (eps 1e-6), then a Linear with trunc_normal(0.01) weights."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    config: LinearProbeConfig = LinearProbeConfig(),
) -> dict[str, float]:
    """Train the probe on (N, D) features / (N,) labels; top-1 and top-5 accuracy (percent) on (M, D) / (M,)."""
    generator = torch.Generator().manual_seed(config.seed)
    train_features, test_features = train_features.float(), test_features.float()
    head = probe_head(train_features.shape[1], num_classes, generator)
    batch = min(config.batch_size, train_features.shape[0])
    iters_per_epoch = train_features.shape[0] // batch
    base_lr = config.blr * batch / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=base_lr, momentum=config.momentum, weight_decay=0.0)
    total, warmup = config.epochs * iters_per_epoch, config.warmup_epochs * iters_per_epoch

    head.train()
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(train_features.shape[0], generator=generator)
        for index in order[: iters_per_epoch * batch].view(iters_per_epoch, batch):
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, base_lr, total, warmup)
            loss = F.cross_entropy(head(train_features[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

    head.eval()
    with torch.no_grad():
        top = head(test_features).topk(min(5, num_classes), dim=1).indices
    correct = top == test_labels.unsqueeze(1)
    return {
        "top1": 100.0 * correct[:, 0].float().mean().item(),
        "top5": 100.0 * correct.any(dim=1).float().mean().item(),
    }


def probe_metrics(
    train: tuple[dict[str, torch.Tensor], torch.Tensor],
    test: tuple[dict[str, torch.Tensor], torch.Tensor],
    num_classes: int,
    feature: str,
    config: LinearProbeConfig = LinearProbeConfig(),
    prefix: str = "linear",
) -> dict[str, float]:
    """The probe on every feature of :func:`~maskray.eval.features.extract_features`'s output.

    ``train`` / ``test``: ``({"cls": (N, D), "mean": (N, D)}, labels (N,))``. Returns ``{prefix}_top1_cls``,
    ``{prefix}_top1_mean`` and, for ``feature``, ``{prefix}_top1`` / ``{prefix}_top5`` (the k-NN naming).
    """
    metrics: dict[str, float] = {}
    for name in FEATURES:
        accuracy = linear_probe(train[0][name], train[1], test[0][name], test[1], num_classes, config)
        metrics[f"{prefix}_top1_{name}"] = accuracy["top1"]
        if name == feature:
            metrics[f"{prefix}_top1"] = accuracy["top1"]
            metrics[f"{prefix}_top5"] = accuracy["top5"]
    return metrics
