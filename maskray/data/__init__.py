"""Data layer: shard writing (WebDataset tars + Parquet manifest), sources, decoded samples, transforms and views,
and the streaming reader."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from maskray.data.manifest import MANIFEST_NAME, ShardSet, read_manifest, resolve_shards
from maskray.data.reader import LoaderOptions, batch_size, build_loader, collate, infinite_batches, steps_per_epoch
from maskray.data.sample import DecodedSample
from maskray.data.sources import (
    Source,
    clip_folder,
    demo,
    image_folder,
    named_sources,
    parquet_file,
    register_source,
    split_indices,
)
from maskray.data.writer import Sample, write_shards

if TYPE_CHECKING:
    from maskray.data.transforms import ImageTransform, Photometric
    from maskray.data.views import BlockMask, FramePair, MultiCrop, RandomMask, SharedCrop, Views

# torchvision takes seconds to import (it pulls in torch._dynamo); make_shards.py never needs it
_LAZY = {
    "ImageTransform": "maskray.data.transforms",
    "Photometric": "maskray.data.transforms",
    "BlockMask": "maskray.data.views",
    "FramePair": "maskray.data.views",
    "MultiCrop": "maskray.data.views",
    "RandomMask": "maskray.data.views",
    "SharedCrop": "maskray.data.views",
    "Views": "maskray.data.views",
}

__all__ = [
    "MANIFEST_NAME",
    "BlockMask",
    "DecodedSample",
    "FramePair",
    "ImageTransform",
    "LoaderOptions",
    "MultiCrop",
    "Photometric",
    "RandomMask",
    "Sample",
    "ShardSet",
    "SharedCrop",
    "Source",
    "Views",
    "batch_size",
    "build_loader",
    "clip_folder",
    "collate",
    "demo",
    "image_folder",
    "infinite_batches",
    "named_sources",
    "parquet_file",
    "read_manifest",
    "register_source",
    "resolve_shards",
    "split_indices",
    "steps_per_epoch",
    "write_shards",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
