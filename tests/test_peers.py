"""maskray's MAE against the peers' (``benchmarks/peers.py``, the ``peers`` extra): the same loss for the same
weights, images and mask."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lightly")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peers  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1])
def test_mae_loss_equals_hugging_face_and_lightly_for_the_same_weights_and_mask(one_thread, seed) -> None:
    losses = peers.same_weights_losses(peers.ARCHS["demo"], batch=3, seed=seed)
    assert losses["maskray"] == pytest.approx(losses["hf"], rel=1e-5)
    assert losses["maskray"] == pytest.approx(losses["lightly"], rel=1e-5)


@pytest.mark.parametrize("library", ["maskray", "lightly"])
def test_a_peers_step_worker_reports_its_speed_and_memory(library) -> None:
    """One ``peers_step.py`` worker process at the demo size: images/s, peak RSS above the training's memory."""
    import json
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "peers_step.py"
    done = subprocess.run([sys.executable, str(script), "--worker", library, "--arch", "demo", "--precision", "fp32",
                           "--batch", "4", "--steps", "2", "--warmup", "0"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["images_per_s"] > 0 and len(result["losses"]) == 2
    assert 0 < result["training_mib"] < result["peak_rss_mib"]
    assert result["gflop_per_image"] > 0
