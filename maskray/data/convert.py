"""Converting a :class:`~maskray.data.sources.Source` into a shard directory: in parallel, skipping items that
cannot be decoded, resumable after an interruption.

The write order (``indices``) is cut into consecutive chunks of ``samples_per_shard``; chunk ``k`` becomes
``shard-<k>.tar``. Which process writes a chunk does not change its content (tars have fixed member times), so
``workers=N`` writes the same bytes as ``workers=1``. An item whose ``load`` raises a :class:`DataError` (an
undecodable image, a clip with frames of different sizes, a row without image bytes) is skipped and listed; a
shard keeps the items of its chunk that loaded, so a skipped item leaves its shard one sample short (a chunk
with no loadable item writes no tar: shard numbers then have a gap).

Resume: while converting, ``OUT/.parts/`` holds ``plan.json`` (source, write-order digest, samples per shard)
and, per finished shard, ``shard-<k>.json`` (its manifest rows and skipped items), written only after the tar
got its final name (tars are written as ``.partial`` and renamed). A converted shard is therefore one with a
marker; ``resume=True`` keeps those tars as they are and writes the others again. Once all shards are written,
the manifest and ``make_shards_report.json`` (counts, throughput and every skipped item with its reason) are
written next to the shards and ``.parts/`` is removed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from maskray.data.manifest import SHARD_TEMPLATE, ShardSet
from maskray.data.sources import Source
from maskray.data.writer import (
    Sample,
    empty_columns,
    extend_columns,
    finish_shards,
    prepare_out_dir,
    write_tar,
)
from maskray.errors import DataError

PARTS_DIR = ".parts"
PLAN_FILE = "plan.json"
REPORT_NAME = "make_shards_report.json"


@dataclass(frozen=True)
class Skipped:
    """An item of the source that was not converted: its index and the one-line reason naming the file."""

    index: int
    reason: str


@dataclass(frozen=True)
class Conversion:
    """A finished conversion: the shard set, the skipped items, shards kept from an interrupted run, and the items
    this run read (kept shards' items not included) in ``seconds``."""

    shards: ShardSet
    skipped: tuple[Skipped, ...]
    kept_shards: int
    items_read: int
    seconds: float

    @property
    def items_per_second(self) -> float:
        return self.items_read / max(self.seconds, 1e-9)


def convert(
    source: Source,
    indices: Sequence[int] | np.ndarray,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Conversion:
    """Write the items ``indices`` of ``source`` (in that order) into ``out_dir`` (see the module docstring).

    ``workers > 1`` loads and writes shards in that many forked processes. ``resume`` continues the interrupted
    conversion of the same plan in ``out_dir`` (a DataError when ``out_dir`` holds none, or one of another plan);
    ``overwrite`` starts afresh.
    """
    if samples_per_shard < 1:
        raise DataError(f"OUT: samples per shard must be >= 1, got {samples_per_shard}")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    indices = np.asarray(indices, dtype=np.int64)
    plan = {"source": source.description, "samples_per_shard": samples_per_shard, "samples": len(indices),
            "order_sha256": hashlib.sha256(indices.tobytes()).hexdigest()}
    out, parts = Path(out_dir), Path(out_dir, PARTS_DIR)
    if resume:
        _check_plan(parts, plan, out_dir)
    else:
        out = prepare_out_dir(out_dir, overwrite)
        shutil.rmtree(parts, ignore_errors=True)
        (out / REPORT_NAME).unlink(missing_ok=True)
        parts.mkdir()
        (parts / PLAN_FILE).write_text(json.dumps(plan, indent=1))

    chunks = [indices[start:start + samples_per_shard] for start in range(0, len(indices), samples_per_shard)]
    done = {k: json.loads(_marker(parts, k).read_text()) for k in range(len(chunks)) if _marker(parts, k).is_file()}
    todo = [k for k in range(len(chunks)) if k not in done]
    started = time.perf_counter()
    items_read = sum(len(chunks[k]) for k in todo)
    bar = tqdm(total=items_read, desc=f"converting {out_dir}", unit="sample",
               disable=not progress)
    for k, part in _run(todo, chunks, source, out, workers):
        done[k] = part
        bar.update(len(chunks[k]))
        bar.set_postfix(skipped=sum(len(p["skipped"]) for p in done.values()), refresh=False)
    bar.close()
    seconds = time.perf_counter() - started

    columns, skipped = empty_columns(), []
    for k in range(len(chunks)):
        extend_columns(columns, done[k]["columns"])
        skipped += [Skipped(int(index), reason) for index, reason in done[k]["skipped"]]
    duplicates = {key for key, count in zip(*np.unique(columns["key"], return_counts=True), strict=True) if count > 1}
    if duplicates:
        raise DataError(f"OUT: duplicate sample key '{sorted(duplicates)[0]}'")
    shards = finish_shards(out, columns, source.class_names, source.description)
    result = Conversion(shards, tuple(skipped), len(chunks) - len(todo), items_read, seconds)
    _write_report(out / REPORT_NAME, result, source.description)
    shutil.rmtree(parts)
    return result


def _marker(parts: Path, k: int) -> Path:
    return parts / (Path(SHARD_TEMPLATE.format(k)).stem + ".json")


def _check_plan(parts: Path, plan: dict, out_dir: str | os.PathLike) -> None:
    plan_file = parts / PLAN_FILE
    if not plan_file.is_file():
        raise DataError(f"--resume: '{out_dir}' holds no interrupted conversion ({PARTS_DIR}/{PLAN_FILE} is missing)")
    found = json.loads(plan_file.read_text())
    if found != plan:
        changed = ", ".join(key for key in plan if found.get(key) != plan[key])
        raise DataError(f"--resume: the interrupted conversion in '{out_dir}' has another {changed}; "
                        "pass the same arguments, or --overwrite to start again")


# The job of forked worker processes: set before the pool forks, so the source (whose loaders are closures)
# is inherited rather than pickled.
_JOB: tuple[Source, Path] | None = None


def _run(todo: list[int], chunks: list[np.ndarray], source: Source, out: Path, workers: int):
    """Yield ``(k, part)`` as shards ``todo`` are written (``part``: their marker's content)."""
    global _JOB
    if workers == 1 or len(todo) <= 1:
        for k in todo:
            yield k, _write_shard(source, out, k, chunks[k])
        return
    _JOB = (source, out)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {pool.submit(_write_forked_shard, k, chunks[k]): k for k in todo}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        _JOB = None


def _write_forked_shard(k: int, chunk: np.ndarray) -> dict:
    assert _JOB is not None, "a forked worker inherits _JOB"
    return _write_shard(*_JOB, k, chunk)


def _write_shard(source: Source, out: Path, k: int, chunk: np.ndarray) -> dict:
    """Load the items of ``chunk`` (skipping those whose load raises a DataError), write ``shard-<k>.tar`` and its
    marker; return the marker's content (manifest columns and ``[index, reason]`` of skipped items)."""
    skipped: list[tuple[int, str]] = []

    def loaded() -> Iterator[Sample]:
        for index in chunk:
            try:
                yield source.load(int(index))
            except DataError as exc:
                skipped.append((int(index), str(exc)))

    columns = write_tar(loaded(), out / SHARD_TEMPLATE.format(k), len(source.class_names), set())
    part = {"columns": columns, "skipped": skipped}
    marker = _marker(out / PARTS_DIR, k)
    partial = marker.with_suffix(".partial")
    partial.write_text(json.dumps(part))
    os.replace(partial, marker)
    return part


def _write_report(path: Path, result: Conversion, description: str) -> None:
    report = {
        "source": description,
        "samples": result.shards.num_samples,
        "shards": len(result.shards.urls),
        "kept_shards": result.kept_shards,
        "items_read": result.items_read,
        "seconds": round(result.seconds, 3),
        "items_per_second": round(result.items_per_second, 1),
        "skipped": [{"index": item.index, "reason": item.reason} for item in result.skipped],
    }
    path.write_text(json.dumps(report, indent=1))
