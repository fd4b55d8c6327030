"""``configs/paper/*.yaml``: each method's ViT-B/16 ImageNet-1K recipe, checked against the paper's numbers.

Steps come from epochs with the reference loaders' drop_last: ``epochs * floor(1,281,167 / global batch)``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from maskray.config import load_config

REPO = Path(__file__).resolve().parents[1]
IMAGENET = 1_281_167


def steps(epochs: float, batch: int) -> int:
    return int(epochs * (IMAGENET // batch))


# file: (global batch, learning rate, optimizer steps, warm-up steps, objective name) from the paper
PAPER = {
    "mae.yaml": (4096, 1.5e-4 * 4096 / 256, steps(1600, 4096), steps(40, 4096), "mae"),
    "msn.yaml": (1024, 1e-3, steps(600, 1024), steps(15, 1024), "msn"),
}


def test_every_paper_config_is_checked() -> None:
    assert sorted(p.name for p in (REPO / "configs" / "paper").glob("*.yaml")) == sorted(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_matches_the_paper(name: str) -> None:
    batch, lr, total, warmup, objective = PAPER[name]
    config = load_config(REPO / "configs" / "paper" / name)
    assert config.global_batch() == batch
    assert config.learning_rate() == pytest.approx(lr, rel=1e-9)
    assert config.train.steps == total and config.optim.warmup_steps == warmup
    assert config.objective.name == objective
    assert config.model.img_size == 224 and config.model.patch_size == 16
