"""Shared fixtures: one Ray instance per session (2 CPUs), demo shards built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import free_port, local_s3, start_mlflow_server, stop_process

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Read when @triton.jit decorates a kernel: set before anything imports Triton. Kernels only run on CPU
# tensors when a test also sets MASKRAY_TRITON_INTERPRET=1 (tests/test_kernels.py). MASKRAY_TRITON_DEVICE=cuda
# (the GPU suite, benchmarks/gpu/run.sh) leaves it unset: the kernel tests then run compiled kernels on the GPU.
if os.environ.get("MASKRAY_TRITON_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = Path(__file__).resolve().parents[1]
# Test-only objectives (tests/plugins/maskray_testing), importable here and in Ray workers.
PLUGINS = REPO / "tests" / "plugins"
sys.path.insert(0, str(PLUGINS))
os.environ["MASKRAY_PLUGINS"] = "objectives,maskray_testing"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))


@pytest.fixture
def one_thread():
    """Small CPU ops are much faster single-threaded on a shared 2-core machine (and results reproducible)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray with 2 CPUs, shared by the tests of a module. Started once per module, not per session: after
    a few Ray Train runs, Ray Tune sweeps and Ray tasks in one long-lived local instance, a later TorchTrainer run
    was seen to hang after requesting its resources (Ray 2.60, 0 of 2 CPUs in use, no pending demand), so each
    module gets a fresh instance (about 10 s each)."""
    import ray

    env = {key: os.environ[key] for key in ("PYTHONPATH", "MASKRAY_PLUGINS")} | {"PYTHONUNBUFFERED": "1"}
    ray.init(num_cpus=2, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """``<tmp>/demo/{train,test}`` written from scikit-learn's digits through the real CLI."""
    import subprocess

    out = tmp_path_factory.mktemp("shards") / "demo"
    subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), "demo", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def demo_clip_shards(tmp_path_factory) -> Path:
    """``<tmp>/demo_clips/{clips,train,test}``: the moving-digit clips and their labelled frames, through the CLI."""
    import subprocess

    out = tmp_path_factory.mktemp("shards") / "demo_clips"
    subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), "demo-clips", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def process_group():
    """A world-size-1 gloo process group on 127.0.0.1 for DeepSpeed engines inside the test process; yields the
    deepspeed module. Session-wide and destroyed once at the end: DeepSpeed keeps its groups, so a second init
    after a destroy fails."""
    import deepspeed
    import torch.distributed as dist

    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        deepspeed.init_distributed("gloo")
        yield deepspeed
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def s3_bucket():
    """``s3://maskray-test`` on an S3-compatible server (moto's server mode) on 127.0.0.1, started for the module.

    The standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) point at it for the module, so
    pyarrow, boto3 and Ray workers started after this fixture (request it before ``ray_session``) reach it."""
    with local_s3("maskray-test") as uri:
        yield uri


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` process on 127.0.0.1 (free port; SQLite backend and served artifacts under a
    temporary directory), stopped after the module. Yields ``(tracking_uri, artifacts_dir)``."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = start_mlflow_server(root, port)
    yield f"http://127.0.0.1:{port}", root / "artifacts"
    stop_process(process)
