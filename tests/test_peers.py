"""maskray's MAE against the peers' (``benchmarks/peers.py``, the ``peers`` extra): the same loss for the same
weights, images and mask."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lightly")
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # last: not the objectives package

import peers  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1])
def test_mae_loss_equals_hugging_face_and_lightly_for_the_same_weights_and_mask(one_thread, seed) -> None:
    losses = peers.same_weights_losses(peers.ARCHS["demo"], batch=3, seed=seed)
    assert losses["maskray"] == pytest.approx(losses["hf"], rel=1e-5)
    assert losses["maskray"] == pytest.approx(losses["lightly"], rel=1e-5)
