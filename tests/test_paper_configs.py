"""``configs/paper/*.yaml``: each method's ViT-B/16 ImageNet-1K recipe, checked against the paper's numbers.

Steps come from epochs with the reference loaders' drop_last: ``epochs * floor(1,281,167 / global batch)`` for the
ImageNet-1K recipes; ToBo's (Kinetics-400 videos, two pairs per video) is derived in :func:`tobo_steps`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from maskray.config import load_config

REPO = Path(__file__).resolve().parents[1]
IMAGENET = 1_281_167


KINETICS400 = 240_436  # train videos of the Kinetics-400 list that RSP / ToBo train on


def steps(epochs: float, batch: int) -> int:
    return int(epochs * (IMAGENET // batch))


def tobo_steps(epochs: int, videos_per_gpu: int = 24, gpus: int = 8, accum: int = 8, repeated: int = 2) -> int:
    """ToBo's loop: ``epochs // repeated`` passes over the videos (main_pretrain_tobo.py divides its epochs by
    repeated_sampling); a pass is floor(videos / (videos_per_gpu * gpus)) loader iterations per GPU (drop_last),
    one optimizer step per ``accum`` of them."""
    return epochs // repeated * (KINETICS400 // (videos_per_gpu * gpus) // accum)


# file: (global batch, learning rate, optimizer steps, warm-up steps, objective name) from the paper
PAPER = {
    "mae.yaml": (4096, 1.5e-4 * 4096 / 256, steps(1600, 4096), steps(40, 4096), "mae"),
    "dtm.yaml": (2048, 1.5e-3 * (2048 / 2048) ** 0.5, steps(300, 2048), steps(10, 2048), "dtm"),
    "vqkd.yaml": (512, 5e-5 * 512 / 128, steps(100, 512), steps(10, 512), "vqkd"),
    "beitv2.yaml": (2048, 1.5e-3, steps(1600, 2048), steps(10, 2048), "beitv2"),
    "mae_lut.yaml": (4096, 1.5e-4 * math.sqrt(4096) / 4, steps(1600, 4096), steps(40, 4096), "mae_lut"),
    # 3072 pairs = 24 videos x 2 pairs x 8 accum x 8 GPUs; the lr rule counts the 1536 videos
    "tobo.yaml": (3072, 1.5e-4 * 1536 / 256, tobo_steps(400), tobo_steps(40), "tobo"),
    "moco_v3.yaml": (4096, 1.5e-4 * 4096 / 256, steps(300, 4096), steps(40, 4096), "moco_v3"),
    "simmim.yaml": (2048, 1e-4 * 2048 / 512, steps(800, 2048), steps(10, 2048), "simmim"),
    "msn.yaml": (1024, 1e-3, steps(600, 1024), steps(15, 1024), "msn"),
}


# file: config keys naming a local file the recipe needs (released weights); the test stands in an empty file
EXTERNAL_FILES = {"vqkd.yaml": ("objective.teacher.path",)}


def test_every_paper_config_is_checked() -> None:
    assert sorted(p.name for p in (REPO / "configs" / "paper").glob("*.yaml")) == sorted(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_matches_the_paper(name: str, tmp_path) -> None:
    batch, lr, total, warmup, objective = PAPER[name]
    (tmp_path / "weights").touch()
    overrides = [f"{key}={tmp_path / 'weights'}" for key in EXTERNAL_FILES.get(name, ())]
    config = load_config(REPO / "configs" / "paper" / name, overrides)
    assert config.global_batch() == batch
    assert config.learning_rate() == pytest.approx(lr, rel=1e-9)
    assert config.train.steps == total and config.optim.warmup_steps == warmup
    assert config.objective.name == objective
    assert config.model.img_size == 224 and config.model.patch_size == 16
