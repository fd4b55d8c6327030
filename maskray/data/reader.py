"""Streaming reader: WebDataset shards -> batches of the transform's outputs plus ``label``, ``key``, ``skipped``,
``bad``.

Shards are split over ``G = world_size * num_workers`` global loader workers, global worker id
``rank * num_workers + worker_id`` (explicit, never from the environment, so it works under Ray).

* Exact epochs (``resampled=False``): the shard list, shuffled from (seed, epoch) when
  ``shuffle_buffer > 0``, is dealt out as shard i -> global worker i % G, so every sample is read once
  per epoch across all ranks and workers; workers without a shard yield nothing. Ranks can get
  different numbers of batches: the training loop counts steps itself (:func:`infinite_batches`).
* Resampled (``resampled=True``): each global worker draws shards with replacement from a generator
  seeded by (seed, epoch, global worker id); an epoch is ``steps_per_epoch`` batches on every rank.

Decoding and transforms run in the loader workers: each raw sample becomes a
:class:`~maskray.data.sample.DecodedSample` and ``transform(sample)`` returns a dict of tensors, numbers
or nested dicts / lists of them, collated by :func:`collate`. Torch's RNG in a loader worker process is
re-seeded from (its per-worker seed, rank), so random augmentations differ across workers and ranks
even when every rank seeded torch alike. A sample that fails to decode or transform, and
the samples a truncated or corrupt tar did not deliver (its manifest count minus the samples read),
are skipped with a warning and counted in the ``skipped`` field of the worker's next batch, so the
sum of ``skipped`` over an epoch is the number of samples lost in it (as long as the worker that
lost them yields at least one batch). The batch's ``bad`` field names them: one :class:`Lost` per shard read
short or sample dropped (:mod:`maskray.data.health` accounts for them over a run). With ``verify=True`` each
sample's member bytes are checked against the manifest's ``sha256`` first, and a sample that differs is dropped
the same way.
"""

from __future__ import annotations

import functools
import itertools
import logging
import numbers
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from maskray import storage
from maskray.data.manifest import ShardSet, member_sha256, read_manifest
from maskray.data.sample import DecodedSample
from maskray.data.tar import tar_samples
from maskray.errors import DataError

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
Transform = Callable[[DecodedSample], dict[str, Any]]
RESERVED = ("key", "label", "skipped", "bad")  # batch fields the reader adds
READ_AHEAD = 64  # raw samples a loader worker reads at a time (see read_tars)
_RESERVED = frozenset(RESERVED)


def steps_per_epoch(shards: ShardSet, batch_size: int, world_size: int) -> int:
    """Batches per rank in one epoch: ``num_samples // (world_size * batch_size)``, at least 1."""
    return max(1, shards.num_samples // (world_size * batch_size))


def build_loader(
    shards: ShardSet,
    transform: Transform,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 1,
    resampled: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = True,
    multiprocessing_context: str | None = None,
    epochs: int | None = 1,
    verify: bool = False,
) -> Iterable[Batch]:
    """A re-iterable loader over one epoch of this rank's batches.

    Each batch: the collated ``transform(sample)`` outputs (e.g. ``image`` (B, C, H, W) float for
    ``Views(image=ImageTransform(...))``), ``label`` (B,) int64 (-1 when unlabelled), ``key`` list[str]
    and ``skipped`` int. ``shuffle_buffer > 0`` shuffles the shard order (exact epochs) and
    the samples within each worker through a buffer of that size. ``num_workers=0`` reads in-process.
    In resampled mode the epoch is ``steps_per_epoch(shards, batch_size, world_size)`` full batches.
    ``epochs=None`` streams epochs ``epoch, epoch + 1, ...`` forever through the same loader processes.
    ``verify`` drops (and reports in ``bad``) samples whose bytes differ from the manifest's sha256.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pipeline = wds.DataPipeline(
        _WorkerShards(shards, rank, world_size, resampled, shuffle_buffer > 0, seed, epoch, epochs),
        functools.partial(read_tars, read_ahead=READ_AHEAD),
        Verify(shards.root) if verify else None,
        _Shuffle(shuffle_buffer, rank, world_size, seed, epoch) if shuffle_buffer > 0 else None,
        _Decode(transform, rank),
        _Batch(batch_size, drop_last),
    )
    loader = wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
    )
    if resampled and epochs is not None:
        loader = loader.with_epoch(epochs * steps_per_epoch(shards, batch_size, world_size))
    return loader


@dataclass(frozen=True)
class LoaderOptions:
    """How a rank's loader reads its stream (:func:`build_loader`'s keywords of the same names), built once from the
    run's ``data`` section by :meth:`of`."""

    batch_size: int
    num_workers: int = 1
    resampled: bool = False
    shuffle_buffer: int = 0
    verify: bool = False
    multiprocessing_context: str | None = None

    @classmethod
    def of(cls, data: Any) -> LoaderOptions:
        """From a :class:`maskray.config.DataConfig` (loader processes start by forkserver)."""
        return cls(data.batch_size, data.num_workers, data.resampled, data.shuffle_buffer, data.verify_sha256,
                   "forkserver" if data.num_workers > 0 else None)


def infinite_batches(
    shards: ShardSet, transform: Transform, options: LoaderOptions, *, rank: int = 0, world_size: int = 1,
    seed: int = 0, start_epoch: int = 0,
) -> Iterator[Batch]:
    """Full batches from epochs ``start_epoch``, ``start_epoch + 1``, ... forever, each epoch re-seeded.

    One loader serves every epoch (its worker processes start once). The caller counts steps, so ranks
    stay in step even when their exact epochs differ in length. Raises DataError if this rank would get
    no shard at all (fewer shards than ranks x loader workers).
    """
    workers = max(options.num_workers, 1)
    if not options.resampled and len(shards.urls) <= rank * workers:
        raise DataError(
            f"data.shards: rank {rank} gets no shard of '{shards.root}' ({len(shards.urls)} shards over "
            f"{world_size} ranks x {workers} loader workers); write more or smaller shards or use resampling"
        )
    yield from build_loader(shards, transform, rank=rank, world_size=world_size, seed=seed, epoch=start_epoch,
                            drop_last=True, epochs=None, **asdict(options))


def _global_worker(rank: int, world_size: int) -> tuple[int, int]:
    """(global worker id, number of global workers) of the calling loader worker (in-process: 1 worker)."""
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * num_workers + worker, world_size * num_workers


@dataclass(frozen=True)
class Lost:
    """``count`` samples of ``shard`` (its file name) lost: ``key`` names the sample when one was dropped, empty
    when a shard ended early or could not be read; ``reason`` is the one-line cause. Also the stream marker that
    carries the loss from the stage that saw it to the batcher."""

    shard: str
    count: int
    reason: str
    key: str = ""


class _WorkerShards(IterableDataset):
    """The (tar path, expected sample count) pairs that the calling global worker reads, for ``epochs``
    epochs from ``epoch`` on (``None``: forever, in one pass of the loader, so its processes live on)."""

    def __init__(
        self,
        shards: ShardSet,
        rank: int,
        world_size: int,
        resampled: bool,
        shuffle: bool,
        seed: int,
        epoch: int,
        epochs: int | None = 1,
    ):
        super().__init__()
        self.shards = list(zip(shards.urls, shards.shard_sizes, strict=True))
        self.rank, self.world_size = rank, world_size
        self.resampled, self.shuffle = resampled, shuffle
        self.seed, self.epoch, self.epochs = seed, epoch, epochs

    def __iter__(self) -> Iterator[tuple[str, int]]:
        worker, num_global = _global_worker(self.rank, self.world_size)
        if self.resampled:  # an endless draw; build_loader caps a single epoch with ``with_epoch``
            rng = np.random.default_rng([self.seed, self.epoch, worker])
            while True:
                yield self.shards[rng.integers(len(self.shards))]
        epochs = itertools.count(self.epoch) if self.epochs is None else range(self.epoch, self.epoch + self.epochs)
        for epoch in epochs:
            order = np.arange(len(self.shards))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(order)
            mine = order[worker::num_global]
            if len(mine) == 0:  # the same count every epoch: this worker never has a shard
                return
            for i in mine:
                yield self.shards[i]


def read_tars(shards: Iterable[tuple[str, int]], read_ahead: int = 1) -> Iterator[dict | Lost]:
    """Raw samples (``__key__``, ``__url__``, ``png``/``cls``/...) of each tar, then a :class:`Lost`
    marker for the samples a truncated or corrupt tar did not deliver. ``read_ahead`` samples of a shard are read
    before they are handed on (the loader reads :data:`READ_AHEAD`: parsing in bursts keeps the reader's code and
    data in the CPU's caches between the decodes, ~5 % of a small image's time); the stream is the same."""
    for url, expected in shards:
        read, error, ahead = 0, "", []
        try:
            with storage.open_input(url) as stream:  # a local file or an object-store stream
                for sample in tar_samples(stream, url):
                    ahead.append(sample)
                    if len(ahead) >= read_ahead:
                        read, ready, ahead = read + len(ahead), ahead, []
                        yield from ready
        except Exception as exc:  # a read error loses the rest of this shard only
            error = f" ({_reason(exc)})"
        read += len(ahead)
        yield from ahead
        if read < expected:
            logger.warning("shard '%s': read %d of %d samples%s; skipping the rest", url, read, expected, error)
            yield Lost(os.path.basename(url), expected - read, f"read {read} of {expected} samples{error}")


class _Shuffle:
    """Shuffle buffer over raw samples, seeded by (seed, epoch, global worker id)."""

    def __init__(self, bufsize: int, rank: int, world_size: int, seed: int, epoch: int):
        self.bufsize, self.rank, self.world_size = bufsize, rank, world_size
        self.seed, self.epoch = seed, epoch

    def __call__(self, samples: Iterator[dict | Lost]) -> Iterator[dict | Lost]:
        worker, _ = _global_worker(self.rank, self.world_size)
        seed = int(np.random.SeedSequence([self.seed, self.epoch, worker]).generate_state(1)[0])
        return wds.shuffle(self.bufsize, initial=self.bufsize, seed=seed)(samples)


class Verify:
    """Drop (as ``Lost``) the samples whose member bytes do not hash to the manifest's ``sha256`` for their
    (shard, key); the manifest is read once per loader worker, at its first sample."""

    def __init__(self, root: str):
        self.root = root

    def __call__(self, samples: Iterable[dict | Lost]) -> Iterator[dict | Lost]:
        expected: dict[tuple[str, str], str] | None = None
        for sample in samples:
            if isinstance(sample, Lost):
                yield sample
                continue
            if expected is None:
                table = read_manifest(self.root).select(["shard", "key", "sha256"]).to_pydict()
                expected = dict(zip(zip(table["shard"], table["key"], strict=True), table["sha256"], strict=True))
            shard, key = os.path.basename(sample["__url__"]), sample["__key__"]
            wanted = expected.get((shard, key))
            if member_sha256(_decoded(sample).members) != wanted:
                reason = "not in the manifest" if wanted is None else "bytes differ from the manifest's sha256"
                logger.warning("skipping sample '%s' in shard '%s': %s", key, shard, reason)
                yield Lost(shard, 1, reason, key)
                continue
            yield sample


class _Decode:
    """Raw sample -> ``{**transform(DecodedSample), "label", "key"}``; failures become a ``Lost`` of 1 sample."""

    def __init__(self, transform: Transform, rank: int):
        self.transform, self.rank = transform, rank

    def __call__(self, samples: Iterable[dict | Lost]) -> Iterator[dict | Lost]:
        if get_worker_info() is not None:  # a loader process: its torch seed is per worker, not yet per rank
            torch.manual_seed(int(np.random.SeedSequence([torch.initial_seed(), self.rank]).generate_state(1)[0]))
        for sample in samples:
            if isinstance(sample, Lost):
                yield sample
                continue
            key = sample["__key__"]
            try:
                decoded = _decoded(sample)
                label = decoded.label
                out = self.transform(decoded)
            except Exception as exc:  # warn and continue, like wds.warn_and_continue
                shard = os.path.basename(sample["__url__"])
                logger.warning("skipping sample '%s' in shard '%s': %s", key, shard, exc)
                yield Lost(shard, 1, _reason(exc), key)
                continue
            if not isinstance(out, dict) or not _RESERVED.isdisjoint(out):
                raise TypeError(f"a transform must return a dict without the keys {RESERVED}, got {type(out).__name__}"
                                + (f" with keys {sorted(out)}" if isinstance(out, dict) else ""))
            yield {**out, "label": label, "key": key}


def _decoded(sample: dict) -> DecodedSample:
    """A raw tar sample (``__key__``, ``__url__``, ``cls``, members) as a :class:`DecodedSample`."""
    label = int(sample["cls"]) if "cls" in sample else -1
    members = {name: data for name, data in sample.items() if name != "cls" and not name.startswith("__")}
    return DecodedSample(key=sample["__key__"], label=label, url=sample["__url__"], members=members)


def first_sample(shards: ShardSet) -> DecodedSample | None:
    """The first sample of the first shard (None when it delivers none), e.g. for checks in the driver."""
    for sample in read_tars([(shards.urls[0], shards.shard_sizes[0])]):
        return None if isinstance(sample, Lost) else _decoded(sample)
    return None


class _Batch:
    """Collate decoded samples into batches, summing ``Lost`` markers into ``skipped`` and listing them in ``bad``.

    One full batch is held back so that losses after the last batch are still counted: they are
    added to the final batch (or to the partial batch when ``drop_last`` is false).
    """

    def __init__(self, batch_size: int, drop_last: bool):
        self.batch_size, self.drop_last = batch_size, drop_last

    def __call__(self, samples: Iterable[dict | Lost]) -> Iterator[Batch]:
        held: Batch | None = None
        items: list[dict] = []
        lost: list[Lost] = []
        for sample in samples:
            if isinstance(sample, Lost):
                lost.append(sample)
                continue
            items.append(sample)
            if len(items) == self.batch_size:
                if held is not None:
                    yield held
                held, items, lost = _collate(items, lost), [], []
        if items and not self.drop_last:
            if held is not None:
                yield held
            held, lost = _collate(items, lost), []
        if held is not None:
            held["skipped"] += sum(item.count for item in lost)
            held["bad"] += lost
            yield held


def _reason(exc: Exception) -> str:
    """The first argument of an exception (webdataset appends the stream and url to ``args``)."""
    return f"{type(exc).__name__}: {exc.args[0] if exc.args else ''}"


def batch_size(batch: Batch) -> int:
    """The number of samples in a batch (its ``key`` list)."""
    return len(batch["key"])


def collate(values: list) -> Any:
    """Collate per-sample values: tensors stacked along a new dim 0, python numbers -> tensor, strings -> list,
    dicts -> dict of collated fields, lists / tuples -> list of collated positions."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if isinstance(first, numbers.Number):
        return torch.tensor(values)
    if isinstance(first, str):
        return list(values)
    if isinstance(first, dict):
        other = next((value for value in values if value.keys() != first.keys()), first)
        if other is not first:
            raise ValueError(f"cannot collate dicts with different keys: {sorted(first)} and {sorted(other)}")
        return {name: collate([value[name] for value in values]) for name in first}
    if isinstance(first, (list, tuple)):
        return [collate(list(position)) for position in zip(*values, strict=True)]
    raise TypeError(f"cannot collate {type(first).__name__} (expected tensors, numbers, strings, dicts, lists)")


def _collate(items: list[dict], lost: list[Lost]) -> Batch:
    return {**collate(items), "skipped": sum(item.count for item in lost), "bad": list(lost)}
