"""Write samples into WebDataset shards (``shard-000000.tar``, ...) plus ``manifest.parquet``."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from maskray.data.manifest import (
    ARRAY_MEMBER,
    BANDS_MEMBER,
    IMAGE_EXTS,
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    SHARD_GLOB,
    SHARD_TEMPLATE,
    ShardSet,
    member_sha256,
    resolve_shards,
    write_manifest,
)
from maskray.data.sample import bands_shape, clip_shape
from maskray.errors import DataError

_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_INDEXED_RE = re.compile(rf"([0-9]{{3,}})\.({'|'.join(IMAGE_EXTS)})")
_TAR_MTIME = 0  # fixed member timestamps make the tars reproducible; an int: a float gets a PAX header per member


@dataclass(init=False)
class Sample:
    """One sample to store: ``members`` maps member names to bytes (see :mod:`maskray.data.manifest`).

    ``Sample(key, image=data, ext="png", label=3)`` stores a single encoded image of type ``ext``;
    ``Sample(key, {"000.png": a, "001.png": b})`` several images or frames; ``Sample(key, {"npy": npy_bytes})`` a clip.
    """

    key: str
    members: dict[str, bytes]
    label: int | None

    def __init__(
        self,
        key: str,
        members: dict[str, bytes] | None = None,
        label: int | None = None,
        *,
        image: bytes | None = None,
        ext: str | None = None,
    ):
        if (members is None) == (image is None) or (image is None) != (ext is None):
            raise TypeError("Sample takes either members or image and ext")
        self.key, self.label = key, label
        self.members = dict(members) if members is not None else {ext: image}

    @property
    def frames(self) -> int:
        """1 for a single image, T for several images or a clip (``members`` must be valid)."""
        if ARRAY_MEMBER in self.members:
            return clip_shape(self.members[ARRAY_MEMBER])[0]
        return len(self.members)


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
    given, else ``max(label) + 1`` (0 when no sample is labelled). A parallel, resumable conversion of a
    :class:`~maskray.data.sources.Source` that skips undecodable items is :func:`maskray.data.convert.convert`.
    """
    if samples_per_shard < 1:
        raise DataError(f"OUT: samples per shard must be >= 1, got {samples_per_shard}")
    out = prepare_out_dir(out_dir, overwrite)
    columns = empty_columns()
    seen: set[str] = set()
    stream = iter(tqdm(samples, total=total, desc=f"writing {out_dir}", unit="sample", disable=not progress))
    for index in itertools.count():
        chunk = list(itertools.islice(stream, samples_per_shard))
        if not chunk:
            break
        extend_columns(columns, write_tar(chunk, out / SHARD_TEMPLATE.format(index), len(class_names), seen))
    return finish_shards(out, columns, class_names, source)


def empty_columns() -> dict[str, list]:
    return {name: [] for name in MANIFEST_SCHEMA.names}


def extend_columns(columns: dict[str, list], more: dict[str, list]) -> None:
    for name, values in more.items():
        columns[name].extend(values)


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Check ``out_dir`` (:func:`check_out_dir`), remove old shards and manifest with ``overwrite`` (other files
    stay), create it."""
    check_out_dir(out_dir, overwrite)
    out = Path(out_dir)
    for old in [*out.glob(SHARD_GLOB), out / MANIFEST_NAME]:
        old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_tar(samples: Iterable[Sample], path: Path, num_names: int, seen: set[str]) -> dict[str, list]:
    """Write ``samples`` into the tar ``path`` (under a temporary name, renamed once complete, so a tar with its
    final name is always whole) and return their manifest columns. ``seen`` collects keys (duplicates are
    refused); ``num_names`` bounds labels when > 0. Writes nothing for no samples."""
    columns = empty_columns()
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME)
            try:
                for sample in samples:
                    _check_sample(sample, seen, num_names)
                    record = {"__key__": sample.key, **sample.members}
                    if sample.label is not None:
                        record["cls"] = str(sample.label).encode("ascii")
                    writer.write(record)
                    seen.add(sample.key)
                    columns["shard"].append(path.name)
                    columns["key"].append(sample.key)
                    columns["label"].append(-1 if sample.label is None else sample.label)
                    columns["nbytes"].append(sum(len(data) for data in sample.members.values()))
                    columns["sha256"].append(member_sha256(sample.members))
                    columns["frames"].append(sample.frames)
            finally:
                writer.close()
        if columns["key"]:
            os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return columns


def finish_shards(out: Path, columns: dict[str, list], class_names: Sequence[str], source: str) -> ShardSet:
    """Write the manifest of the tars in ``out`` from their ``columns`` and resolve the directory."""
    if not columns["key"]:
        raise DataError(f"OUT: no samples to write to '{out}'")
    num_classes = len(class_names) or max(columns["label"]) + 1
    write_manifest(out, columns, num_classes=num_classes, class_names=class_names, source=source)
    return resolve_shards(str(out), key="OUT")


def _check_sample(sample: Sample, seen: set[str], num_names: int) -> None:
    if not _KEY_RE.fullmatch(sample.key):
        raise DataError(f"OUT: sample key '{sample.key}' must match [A-Za-z0-9_-]+ (no dots or slashes)")
    if sample.key in seen:
        raise DataError(f"OUT: duplicate sample key '{sample.key}'")
    _check_members(sample)
    if sample.label is not None and (sample.label < 0 or (num_names and sample.label >= num_names)):
        expected = f"0..{num_names - 1}" if num_names else ">= 0"
        raise DataError(f"OUT: sample '{sample.key}' has label {sample.label}, expected {expected}")


def _check_members(sample: Sample) -> None:
    """One image (``png``, ...), one ``bands.npy`` band image, indexed images (``000.png``, ...: one digit count)
    or one ``npy`` clip."""
    names = sorted(sample.members)
    where = f"OUT: sample '{sample.key}'"
    if not names:
        raise DataError(f"{where} has no members")
    for member, check in ((ARRAY_MEMBER, clip_shape), (BANDS_MEMBER, bands_shape)):
        if names == [member]:
            try:
                check(sample.members[member])
            except ValueError as exc:
                raise DataError(f"{where}: {exc}") from exc
            return
    if len(names) == 1 and names[0] in IMAGE_EXTS:
        return
    matches = [_INDEXED_RE.fullmatch(name) for name in names]
    if not all(matches) or len({len(match.group(1)) for match in matches}) > 1:
        raise DataError(
            f"{where} has members {names}: expected one of {IMAGE_EXTS}, a single '{BANDS_MEMBER}', indexed images "
            f"like 000.png, 001.png (one digit count, >= 3 digits) or a single '{ARRAY_MEMBER}'"
        )
