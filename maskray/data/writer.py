"""Write samples into WebDataset shards (``shard-000000.tar``, ...) plus ``manifest.parquet``."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from maskray.data.manifest import (
    IMAGE_EXTS,
    MANIFEST_NAME,
    SHARD_GLOB,
    SHARD_TEMPLATE,
    ShardSet,
    resolve_shards,
    write_manifest,
)
from maskray.errors import DataError

_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_TAR_MTIME = 0.0  # fixed member timestamps make the tars reproducible


@dataclass
class Sample:
    """One image to store: ``image`` holds encoded bytes of type ``ext`` (png/jpg/jpeg/webp)."""

    key: str
    image: bytes
    ext: str
    label: int | None = None


def sanitise_key(text: str) -> str:
    """Turn a relative path (without its suffix) into a sample key: every character outside
    ``[A-Za-z0-9_-]`` (``/`` and ``.`` included) becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output directory that exists and is not empty, unless ``overwrite``."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise DataError(f"OUT: '{out_dir}' exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DataError(f"OUT: '{out_dir}' exists and is not empty; pass --overwrite")


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    total: int | None = None,
    class_names: Sequence[str] = (),
    source: str = "",
    progress: bool = True,
) -> ShardSet:
    """Write ``samples`` in order into tars of ``samples_per_shard`` samples and a manifest; return the set.

    With ``overwrite`` the old shards and manifest of ``out_dir`` are removed first (other files stay).
    ``total`` only sizes the progress bar. ``num_classes`` is ``len(class_names)`` when names are
    given, else ``max(label) + 1`` (0 when no sample is labelled).
    """
    if samples_per_shard < 1:
        raise DataError(f"OUT: samples per shard must be >= 1, got {samples_per_shard}")
    check_out_dir(out_dir, overwrite)
    out = Path(out_dir)
    for old in [*out.glob(SHARD_GLOB), out / MANIFEST_NAME]:
        old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    columns: dict[str, list] = {"shard": [], "key": [], "label": [], "nbytes": [], "sha256": []}
    seen: set[str] = set()
    writer = None
    try:
        for sample in tqdm(samples, total=total, desc=f"writing {out_dir}", unit="img", disable=not progress):
            _check_sample(sample, seen, len(class_names))
            if len(columns["key"]) % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                shard = SHARD_TEMPLATE.format(len(columns["key"]) // samples_per_shard)
                writer = wds.TarWriter(str(out / shard), encoder=False, mtime=_TAR_MTIME)
            record = {"__key__": sample.key, sample.ext: sample.image}
            if sample.label is not None:
                record["cls"] = str(sample.label).encode("ascii")
            writer.write(record)
            seen.add(sample.key)
            columns["shard"].append(shard)
            columns["key"].append(sample.key)
            columns["label"].append(-1 if sample.label is None else sample.label)
            columns["nbytes"].append(len(sample.image))
            columns["sha256"].append(hashlib.sha256(sample.image).hexdigest())
    finally:
        if writer is not None:
            writer.close()
    if not seen:
        raise DataError(f"OUT: no samples to write to '{out_dir}'")

    num_classes = len(class_names) or max(columns["label"]) + 1
    write_manifest(out, columns, num_classes=num_classes, class_names=class_names, source=source)
    return resolve_shards(str(out), key="OUT")


def _check_sample(sample: Sample, seen: set[str], num_names: int) -> None:
    if not _KEY_RE.fullmatch(sample.key):
        raise DataError(f"OUT: sample key '{sample.key}' must match [A-Za-z0-9_-]+ (no dots or slashes)")
    if sample.key in seen:
        raise DataError(f"OUT: duplicate sample key '{sample.key}'")
    if sample.ext not in IMAGE_EXTS:
        raise DataError(f"OUT: sample '{sample.key}' has image type '{sample.ext}', not one of {IMAGE_EXTS}")
    if sample.label is not None and (sample.label < 0 or (num_names and sample.label >= num_names)):
        expected = f"0..{num_names - 1}" if num_names else ">= 0"
        raise DataError(f"OUT: sample '{sample.key}' has label {sample.label}, expected {expected}")
