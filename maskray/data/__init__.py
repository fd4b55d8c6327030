"""Data layer: shard writing (WebDataset tars + Parquet manifest), sources, transforms and the streaming reader."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from maskray.data.manifest import MANIFEST_NAME, ShardSet, read_manifest, resolve_shards
from maskray.data.reader import build_loader, infinite_batches, steps_per_epoch
from maskray.data.sources import Source, demo, image_folder, parquet_file, split_indices
from maskray.data.writer import Sample, write_shards

if TYPE_CHECKING:
    from maskray.data.transforms import ImageTransform

__all__ = [
    "MANIFEST_NAME",
    "ImageTransform",
    "Sample",
    "ShardSet",
    "Source",
    "build_loader",
    "demo",
    "image_folder",
    "infinite_batches",
    "parquet_file",
    "read_manifest",
    "resolve_shards",
    "split_indices",
    "steps_per_epoch",
    "write_shards",
]


def __getattr__(name: str) -> Any:
    # torchvision takes seconds to import (it pulls in torch._dynamo); make_shards.py never needs it
    if name == "ImageTransform":
        from maskray.data.transforms import ImageTransform

        return ImageTransform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
