"""Shared fixtures: one Ray instance per session (2 CPUs), demo shards built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Read when @triton.jit decorates a kernel: set before anything imports Triton. Kernels only run on CPU
# tensors when a test also sets MASKRAY_TRITON_INTERPRET=1 (tests/test_kernels.py).
os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, shared by every test that needs one."""
    import ray

    ray.init(num_cpus=2, runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """``<tmp>/demo/{train,test}`` written from scikit-learn's digits through the real CLI."""
    import subprocess

    out = tmp_path_factory.mktemp("shards") / "demo"
    subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), "demo", str(out)], check=True)
    return out
