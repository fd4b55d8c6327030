"""Weighted k-NN classifier on frozen features (Wu et al. 2018; DINO's ``eval_knn.py`` protocol).

Features are L2-normalised, similarity is cosine, the k nearest bank samples vote with weight
``exp(sim / T)``. Defaults k=20, T=0.07 as in DINO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores for each query.

    bank: (N, D) features, bank_labels: (N,) int64 in [0, num_classes), queries: (M, D).
    Returns (M, num_classes) summed vote weights.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        sims, index = (queries[start : start + chunk] @ bank.T).topk(k, dim=1)  # (m, k)
        weights = (sims / temperature).exp()
        votes = torch.zeros(index.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        scores.append(votes.scatter_add_(1, bank_labels[index], weights))
    return torch.cat(scores)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (in percent) of the weighted k-NN classifier."""
    scores = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    correct = top == query_labels.unsqueeze(1)
    return {
        "top1": 100.0 * correct[:, 0].float().mean().item(),
        "top5": 100.0 * correct.any(dim=1).float().mean().item(),
    }
