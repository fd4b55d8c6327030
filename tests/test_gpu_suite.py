"""The GPU readiness suite (``benchmarks/gpu/run.sh``, issue 21) runs here in its ``--smoke`` form, so that it is
ready, as is, whenever a GPU is lent: every step on CPU with tiny shapes and interpreted kernels, in this venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

import suite  # noqa: E402


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0][1:] for line in lines] == list(suite.STEPS)  # one summary line per step
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(step["status"] == "ok" for step in summary["steps"].values()), summary
    for step in suite.STEPS:
        record = json.loads((tmp_path / f"{step}.json").read_text())
        assert record["result"], step
    targets = {name: t["met"] for step in summary["steps"].values() for name, t in step["targets"].items()}
    # what a CPU run decides: imports resolve without Ray / MLflow, the kernel tests pass, the losses agree, train
    for name in ("all imports resolve", "no ray / mlflow", "kernel tests pass",
                 "same first-step loss (relative spread)", "ZeRO-0: loss falls, finite", "ZeRO-2: loss falls, finite"):
        assert targets[name], (name, summary)
    assert len(list(tmp_path.iterdir())) <= 8  # the device tool brings back 8 files
    # each library's peers_step.py worker process reports its speed, FLOPs and memory (peak RSS above training's)
    rows = json.loads((tmp_path / "peers.json").read_text())["result"]["rows"]
    assert sorted(row["library"] for row in rows) == ["hf", "lightly", "maskray"]
    for row in rows:
        assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0, row
        assert 0 < row["training_mib"] < row["peak_rss_mib"], row


def test_targets_read_the_figures():
    peers = {"rows": [
        {"library": "maskray", "images_per_s": 130.0, "training_mib": 900.0, "peak_fraction": 0.45,
         "maskray_speed_ratio": 1.0, "maskray_training_memory_ratio": 1.0},
        {"library": "hf", "images_per_s": 100.0, "training_mib": 1000.0, "peak_fraction": 0.3,
         "maskray_speed_ratio": 1.3, "maskray_training_memory_ratio": 0.9},
        {"library": "lightly", "images_per_s": 120.0, "training_mib": 800.0, "peak_fraction": 0.4,
         "maskray_speed_ratio": 130.0 / 120.0, "maskray_training_memory_ratio": 900.0 / 800.0}],
        "same_weights_losses": {"maskray": 1.0, "hf": 1.001, "lightly": 1.0}, "same_weights_precision": "bf16"}
    met = {name: t["met"] for name, t in suite.targets("peers", peers).items()}
    assert met == {"images/s maskray / hf": True, "memory maskray / hf": True, "images/s maskray / lightly": False,
                   "memory maskray / lightly": False, "maskray MFU (bf16 matmul peak)": True,
                   "same first-step loss (relative spread)": True}
    row = {"maskray": {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "pct_peak_fwd": 61.0}}
    masking = {"cases": [{"model": "vit_b16", "batch": 256, "results": {
        "encoder": {**row, "speedup_vs_reference_fwd_bwd": 4.0, "speedup_vs_compiled_fwd_bwd": 0.9},
        "gather": {**row, "speedup_vs_compiled_fwd": 1.5}}}]}
    met = {name: t["met"] for name, t in suite.targets("masking", masking).items()}
    assert met == {"vit_b16 b256: embedding fwd+bwd vs MAE reference": False,
                   "vit_b16 b256: gather % of copy bandwidth": True,
                   "vit_b16 b256: ops slower than torch.compile of the reference": False}
    assert suite.targets("masking", {}) == {}  # a step that left no figures decides nothing
