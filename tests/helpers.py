"""Shared test helpers: arrays as PNG or ``.npy`` bytes (as shards store them), running a launcher, demo digits
and a tiny VQ-KD tokenizer, a free local port, copying a directory to a filesystem URI, a local S3-compatible
server, two gloo processes, two Ray Train runs side by side, and reading back what a run logged to MLflow."""

from __future__ import annotations

import io
import os
import re
import runpy
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(pixels: np.ndarray) -> bytes:
    """(H, W) or (H, W, C) uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    """An array as ``.npy`` bytes (``allow_pickle=True`` writes object arrays, which readers must refuse)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


REPO = Path(__file__).resolve().parents[1]


def launch(script: str, *args: str) -> int:
    """Run ``launch/<script>`` in-process as ``__main__`` with ``args``; returns its exit code."""
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(REPO / "launch" / script), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        sys.argv = argv
    return 0


RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\([\w.:-]+ pid=\d+(, ip=[\d.]+)?\)")


def own_lines(stderr: str) -> list[str]:
    """The lines of a launcher's stderr captured in this process, less those Ray's log monitor forwards from the
    shared instance's workers (``(RayTrainWorker pid=...) ...``): they arrive whenever it reads them."""
    return [line for line in stderr.splitlines() if line.strip() and not RAY_FORWARDED.match(line)]


def demo_digits(size: int, count: int):
    """The bundled scikit-learn digits as (count, 3, size, size) float pixels in [0, 1] (bilinear upsampling)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:count], dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(images, size=size, mode="bilinear").clamp(0, 1).expand(-1, 3, -1, -1)


def tiny_vqkd(img_size: int = 16, num_codes: int = 16, restart_after: int = 5):
    """A one-block VQ-KD objective (a random one-block ViT teacher, 32-wide decoder) at ``img_size`` pixels, patch 4."""
    import torch

    from maskray.config import load_config
    from maskray.models import build_encoder
    from maskray.objective import build_objective

    config = load_config(None, [f"model.img_size={img_size}", "model.depth=1", "objective.name=vqkd",
                                "objective.teacher.source=random", "objective.teacher.arch=vit_tiny_patch16_224",
                                "objective.teacher.model_kwargs={patch_size: 4, depth: 1}",
                                f"objective.num_codes={num_codes}",
                                f"objective.restart_after={restart_after}", "objective.decoder_dim=32"])
    torch.manual_seed(0)
    return build_objective("vqkd", config.objective.params, build_encoder(config.model))


def tiny_tokenizer(directory: Path, img_size: int = 16, num_codes: int = 16) -> Path:
    """Save the tokenizer of :func:`tiny_vqkd` after one training forward (the k-means initialisation) on demo
    digits into ``directory``; returns it."""
    import torch

    from maskray.context import StepContext
    from objectives.vqkd import save_tokenizer

    objective = tiny_vqkd(img_size, num_codes)
    pixels = demo_digits(img_size, 32)
    objective({"crop": [(pixels - 0.5) / 0.5, pixels]}, StepContext(0, 1, generator=torch.Generator().manual_seed(0)))
    return save_tokenizer(directory, objective.tokenizer((0.5,) * 3, (0.5,) * 3))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def upload(local: Path, uri: str) -> str:
    """Copy a local directory tree to a filesystem URI (through pyarrow); returns ``uri``."""
    import pyarrow.fs as pafs

    from maskray.storage import resolve

    filesystem, path = resolve(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
    return uri


@contextmanager
def local_s3(bucket: str) -> Iterator[str]:
    """An S3-compatible server (moto's server mode) on 127.0.0.1 with ``bucket``; yields ``s3://<bucket>``. While
    it runs, the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) of this process point at
    it (restored afterwards), so pyarrow, boto3 and processes started meanwhile reach it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
def spawn_two(worker) -> dict:
    """Run ``worker(rank, port, results)`` in two spawned processes (a module-level function that starts a gloo
    group of 2 on ``tcp://127.0.0.1:<port>``); returns ``results``, the dict the workers fill, by rank."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=2, join=True)
    return dict(results)


# Ray Train runs share the session's 2 CPUs two at a time: with 0.5 CPU per training worker, two runs of up to two
# workers fit side by side. Much of a short 1-worker run is one process starting while the other core idles (its
# controller, then its worker's imports): two such runs at a time take about a quarter less than one after the other
# (CONTRIBUTING.md: 2-worker runs gain little, their gloo ranks then share the cores).
SIDE_BY_SIDE = ("scaling.cpus_per_worker=0.5",)


def two_at_a_time(jobs: Mapping[str, Callable[[dict[str, Future]], object]]) -> dict[str, Future]:
    """Run ``jobs`` (name -> job) in two threads, in the mapping's order, and wait for all of them. Each job gets
    every job's future, so it can wait for one submitted before it (a run that needs an earlier run's output);
    returns the futures (``.result()`` gives a job's value or raises its error, in the test that asks)."""
    futures: dict[str, Future] = {}
    with ThreadPoolExecutor(2) as pool:  # leaving the block waits for every job
        for name, job in jobs.items():
            futures[name] = pool.submit(job, futures)
    return futures


def start_mlflow_server(root: Path, port: int):
    """Start ``mlflow server`` on 127.0.0.1:``port`` (SQLite backend ``root/mlflow.db``, served artifacts in
    ``root/artifacts``, log ``root/server.log``) and wait until it answers; returns the process. Restarting it with
    the same ``root`` and ``port`` brings back the same store."""
    import subprocess
    import time
    import urllib.request

    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    with open(root / "server.log", "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log_tail = (root / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server did not start: {log_tail}") from None
            time.sleep(0.5)


def stop_process(process) -> None:
    """Terminate a process started by a test (kill it after 30 s) and wait for it."""
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tracking_uri(where) -> str:
    return where if isinstance(where, str) else where.tracking.resolved_uri()


def metric_history(where, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of metric ``key`` of ``run_id``, in MLflow's order; ``where``: a config or a tracking URI."""
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(_tracking_uri(where)).get_metric_history(run_id, key)]


def metric_steps(where, run_id: str, key: str) -> list[int]:
    """The steps at which ``key`` of ``run_id`` was logged, in MLflow's order."""
    return [step for step, _ in metric_history(where, run_id, key)]


def experiment_runs(where, experiment: str = "maskray-demo") -> list:
    """Every MLflow run of ``experiment`` (newest first); ``where``: a config or a tracking URI."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(_tracking_uri(where))
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def check_export(result, config, out: Path, in_chans: int) -> None:
    """The final encoder of run ``result`` exports to ``out`` (by run id) and loads strictly into timm with
    ``in_chans`` input channels."""
    import timm
    import torch

    from maskray.export import export_encoder

    exported = export_encoder(out, run_id=result.run_id, tracking_uri=config.tracking.resolved_uri())
    assert exported.timm_kwargs["in_chans"] == in_chans
    model = timm.create_model(exported.arch, num_classes=0, checkpoint_path=str(exported.path),
                              **exported.timm_kwargs)  # loads strictly
    assert model.patch_embed.proj.in_channels == in_chans
    with torch.no_grad():
        assert model(torch.zeros(2, in_chans, 16, 16)).shape == (2, model.embed_dim)
