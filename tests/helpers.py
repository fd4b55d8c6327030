"""Shared test helpers: arrays as PNG or ``.npy`` bytes (as shards store them), running a launcher, and running a
worker in two gloo processes."""

from __future__ import annotations

import io
import runpy
import socket
import sys
from pathlib import Path

import numpy as np
import torch.multiprocessing as mp
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


def spawn_two(worker) -> dict:
    """Run ``worker(rank, port, results)`` in two processes (``mp.spawn``; ``port`` is a free 127.0.0.1 port for
    the gloo group the worker initialises) and return ``results``: what each rank stored under its rank."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(port, results), nprocs=2, join=True)
    return dict(results)
