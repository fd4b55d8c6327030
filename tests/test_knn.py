"""Weighted k-NN on features with known answers."""

from __future__ import annotations

import pytest
import torch

from maskray.eval import knn_accuracy, knn_predict


def test_separable_clusters_are_classified_perfectly() -> None:
    torch.manual_seed(0)
    centers = torch.eye(4, 16) * 10
    labels = torch.arange(4).repeat_interleave(50)
    bank = centers[labels] + torch.randn(200, 16)
    queries = centers[labels] + torch.randn(200, 16)
    assert knn_accuracy(bank, labels, queries, labels, 4)["top1"] == 100.0


def test_random_labels_give_chance() -> None:
    torch.manual_seed(1)
    bank, queries = torch.randn(2000, 32), torch.randn(2000, 32)
    accuracy = knn_accuracy(bank, torch.randint(0, 10, (2000,)), queries, torch.randint(0, 10, (2000,)), 10)
    assert accuracy["top1"] == pytest.approx(10.0, abs=3.0)
    assert accuracy["top5"] == pytest.approx(50.0, abs=5.0)


def test_vote_weights_follow_temperature() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_predict(bank, labels, torch.tensor([[1.0, 0.0]]), 2, k=3, temperature=0.5)
    expected0 = torch.exp(torch.tensor(1.0 / 0.5))
    expected1 = torch.exp(torch.tensor(0.0)) + torch.exp(torch.tensor(0.6 / 0.5))
    torch.testing.assert_close(scores, torch.stack([expected0, expected1]).unsqueeze(0))
