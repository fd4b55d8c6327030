"""The shard-directory format: WebDataset tars plus a Parquet manifest with one row per sample.

A directory written by :func:`maskray.data.writer.write_shards` holds ``shard-000000.tar``, ... and
``manifest.parquet``. A sample is the tar members ``<key>.<name>`` for its member names, plus ``<key>.cls``
(the label as ASCII digits) when labelled. Member names:

* one image: its type, ``png``, ``jpg``, ``jpeg`` or ``webp`` (any mode these hold: L, LA, RGB, RGBA, 16-bit
  grey, palette, ...);
* one image of any number of bands (a multi-page TIFF, one band per page): ``bands.npy``, a uint8 or uint16
  (H, W, C) ``.npy`` array;
* several images or the frames of a clip: ``000.png``, ``001.png``, ... (one digit count, >= 3, per sample);
* one clip as an array: ``npy``, a uint8 (T, H, W) or (T, H, W, C) ``.npy`` array.

The manifest has one row per sample with the columns ``shard`` (tar name relative to the directory),
``key``, ``label`` (-1 when unlabelled), ``nbytes`` (total member bytes), ``sha256`` (of the member bytes
concatenated in sorted member-name order: the image bytes' hash for a single image) and ``frames`` (1
for one image, T for a clip or several images; manifests written before this column read as 1). The
schema metadata stores ``num_classes``, ``class_names`` (a JSON list) and a free-text ``source``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow.fs import FileType

from maskray import storage
from maskray.errors import DataError

MANIFEST_NAME = "manifest.parquet"
SHARD_TEMPLATE = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
ARRAY_MEMBER = "npy"
BANDS_MEMBER = "bands.npy"

MANIFEST_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("label", pa.int64()),
        ("nbytes", pa.int64()),
        ("sha256", pa.string()),
        ("frames", pa.int64()),
    ]
)


@dataclass(frozen=True)
class ShardSet:
    """A resolved shard directory: absolute tar paths or URIs (sorted) and their sample counts."""

    root: str
    urls: tuple[str, ...]
    shard_sizes: tuple[int, ...]
    num_samples: int
    num_classes: int
    class_names: tuple[str, ...]

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0


def member_sha256(members: dict[str, bytes]) -> str:
    """The manifest's ``sha256`` of a sample: its member bytes (``cls`` excluded) concatenated in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(members):
        digest.update(members[name])
    return digest.hexdigest()


def write_manifest(
    directory: str | os.PathLike,
    columns: dict[str, Sequence],
    *,
    num_classes: int,
    class_names: Sequence[str],
    source: str,
) -> None:
    """Write ``manifest.parquet`` from per-sample ``columns`` (the names of ``MANIFEST_SCHEMA``)."""
    metadata = {
        "num_classes": str(num_classes),
        "class_names": json.dumps(list(class_names)),
        "source": source,
    }
    table = pa.table(columns, schema=MANIFEST_SCHEMA.with_metadata(metadata))
    pq.write_table(table, os.path.join(directory, MANIFEST_NAME))


def read_manifest(directory: str | os.PathLike, key: str = "data.shards") -> pa.Table:
    """Read ``directory/manifest.parquet`` (a local path or a filesystem URI); ``key`` names the config key in
    error messages."""
    location = storage.join(storage.absolute(directory), MANIFEST_NAME)
    if not storage.is_file(location):
        raise DataError(f"{key}: '{directory}' has no {MANIFEST_NAME} (write shards with launch/make_shards.py)")
    filesystem, path = storage.resolve(location)
    try:
        table = pq.read_table(path, filesystem=filesystem)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{key}: cannot read '{location}': {_first_line(exc)}") from exc
    if "frames" not in table.column_names:  # written before clips existed: one image per sample
        table = table.append_column(pa.field("frames", pa.int64()), pa.array([1] * table.num_rows, pa.int64()))
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise DataError(f"{key}: '{location}' lacks the column(s) {', '.join(missing)}")
    return table


def resolve_shards(spec: str, key: str = "data.shards") -> ShardSet:
    """Resolve a shard directory ``spec`` (a local path or a filesystem URI such as ``s3://bucket/demo/train``,
    see :mod:`maskray.storage`) into a :class:`ShardSet`, checking that every listed tar exists.

    ``key`` names the config key (``data.shards``, ``eval.train_shards``, ...) in the one-line DataErrors.
    """
    try:
        storage.refuse_shell(spec, key)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    root = storage.absolute(spec)
    try:
        kind = storage.file_type(root)
    except (OSError, ValueError) as exc:
        raise DataError(f"{key}: cannot reach '{spec}': {_first_line(exc)}") from None
    if kind == FileType.NotFound:
        raise DataError(f"{key}: directory '{spec}' does not exist")
    if kind != FileType.Directory:
        raise DataError(f"{key}: '{spec}' is not a directory")
    table = read_manifest(root, key)
    if table.num_rows == 0:
        raise DataError(f"{key}: '{spec}' is empty (0 samples)")
    counts = pc.value_counts(table["shard"]).to_pylist()
    sizes = dict(sorted((row["values"], row["counts"]) for row in counts))
    present = set(storage.list_dir(root))  # one listing, not one request per shard on object storage
    for name in sizes:
        if name not in present:
            raise DataError(f"{key}: shard '{name}' listed in {storage.join(spec, MANIFEST_NAME)} is missing")
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    class_names = tuple(json.loads(metadata.get("class_names", "[]")))
    return ShardSet(
        root=root,
        urls=tuple(storage.join(root, name) for name in sizes),
        shard_sizes=tuple(sizes.values()),
        num_samples=table.num_rows,
        num_classes=int(metadata.get("num_classes", len(class_names))),
        class_names=class_names,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
