"""Encoders for test data: arrays as PNG or ``.npy`` bytes, as shards store them."""

from __future__ import annotations

import io

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
