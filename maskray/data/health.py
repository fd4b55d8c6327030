"""What a run lost of its data, named: the bad shards and samples over all ranks, and the limit that stops a run.

The reader drops what it cannot deliver (a shard read short or missing, an undecodable sample, a sample whose
bytes differ from the manifest) and lists it in each batch's ``bad`` field (:class:`~maskray.data.reader.Lost`).
:class:`DataHealth` takes those lists off the batches of one rank (:meth:`DataHealth.watch`) and, at each log step
(:meth:`DataHealth.check`, a collective), merges every rank's new losses into one report, identical on all ranks:
per shard the samples lost, the first reasons and the dropped keys. Rank 0 logs it as the MLflow artifact
``data/bad_samples.json`` and the tag ``maskray.bad_shards``. When the lost fraction of the samples read so far
(``lost / (read + lost)`` over all ranks) exceeds ``data.max_bad_fraction``, every rank stops at the same step and
rank 0 writes the one-line reason into the run's storage (:func:`stop_note_location`); the driver raises it as a
DataError once the workers have returned (:func:`raise_if_stopped`), so Ray Train does not restart the group.

``MASKRAY_KEY_LOG=<dir>`` (a debug hook for tests of the data split) makes each rank append one JSON line per
batch it consumed to ``<dir>/rank<r>.jsonl``: ``{"rank", "node", "keys"}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from maskray import storage
from maskray.data.manifest import resolve_shards
from maskray.data.reader import Batch, Lost, Verify, batch_size, read_tars
from maskray.errors import DataError

STOP_NOTE = "data_stop.txt"
KEY_LOG_ENV = "MASKRAY_KEY_LOG"
REPORT_ARTIFACT = ("data", "bad_samples.json")  # (artifact path, file name)
BAD_SHARDS_TAG = "maskray.bad_shards"
_KEYS_PER_SHARD = 100  # dropped keys kept per shard in the report
_REASONS_PER_SHARD = 5


def verify_shards(spec: str) -> tuple[int, list[Lost]]:
    """Read every sample of the shard directory ``spec`` and check its bytes against the manifest's sha256:
    ``(samples that match, what was lost)`` (mismatched or unlisted samples, shards read short)."""
    shards = resolve_shards(spec, key="--verify")
    good, lost = 0, []
    for item in Verify(shards.root)(read_tars(zip(shards.urls, shards.shard_sizes, strict=True))):
        if isinstance(item, Lost):
            lost.append(item)
        else:
            good += 1
    return good, lost


def stop_note_location(storage_path: str, run_name: str) -> str:
    """Where rank 0 leaves the reason a run stopped for bad data: ``<storage_path>/<run_name>/data_stop.txt``."""
    return storage.join(storage.absolute(storage_path), run_name, STOP_NOTE)


def clear_stop_note(location: str) -> None:
    """Remove a previous attempt's stop note (a resubmitted run starts clean)."""
    storage.remove(location)


def raise_if_stopped(location: str) -> None:
    """Raise the DataError that the workers left at ``location``, if any."""
    if storage.is_file(location):
        raise DataError(storage.read_text(location).strip())


class DataHealth:
    """One rank's account of the samples it read and lost; :meth:`check` makes it global."""

    def __init__(self, max_bad_fraction: float, rank: int, device: torch.device | str = "cpu",
                 stop_note: str | None = None) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction, self.rank, self.device, self.stop_note = max_bad_fraction, rank, device, stop_note
        self.read = self.lost = 0
        self.new: list[Lost] = []
        self.shards: dict[str, dict] = {}  # the merged report of all ranks, updated by check()
        self.totals = (0, 0)  # (read, lost) over all ranks at the last check
        key_log = os.environ.get(KEY_LOG_ENV)
        self.key_log = os.path.join(key_log, f"rank{rank}.jsonl") if key_log else None

    def watch(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """The batches, with ``bad`` taken off (and counted) and, with ``MASKRAY_KEY_LOG``, their keys logged."""
        for batch in batches:
            lost = batch.pop("bad", [])
            self.read += batch_size(batch)
            self.lost += sum(item.count for item in lost)
            self.new += lost
            if self.key_log:
                self._log_keys(batch["key"])
            yield batch

    def check(self, logger=None) -> bool:
        """Collective (every rank, same step): merge the new losses of all ranks, log the report from rank 0
        (``logger``: a :class:`~maskray.tracking.RunLogger`) when it changed, and return True on every rank when
        the lost fraction exceeds the limit (after rank 0 wrote the stop note)."""
        totals = torch.tensor([self.read, self.lost, len(self.new)], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(totals)
        read, lost, new = (int(value) for value in totals.tolist())
        self.totals = (read, lost)
        if new == 0:
            return False  # nothing lost since the last check: the fraction did not grow
        gathered = [self.new]
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.new)
        self.new = []
        for items in gathered:
            for item in items:
                self._merge(item)
        if logger is not None:
            logger.log_bytes(json.dumps(self.report(), indent=1).encode(), REPORT_ARTIFACT[1], REPORT_ARTIFACT[0])
            logger.set_tags({BAD_SHARDS_TAG: ", ".join(self.shards)[:5000]})
        if lost / max(read + lost, 1) <= self.max_bad_fraction:
            return False
        if self.rank == 0 and self.stop_note:
            storage.write_bytes(self.stop_note, self.stop_message().encode())
        return True

    def report(self) -> dict:
        """``{"samples_read", "samples_lost", "shards": {name: {"lost", "reasons", "keys"}}}`` over all ranks."""
        read, lost = self.totals
        return {"samples_read": read, "samples_lost": lost, "shards": self.shards}

    def stop_message(self) -> str:
        """One line: the lost fraction, the limit and the bad shards (most samples lost first)."""
        read, lost = self.totals
        worst = sorted(self.shards.items(), key=lambda item: -item[1]["lost"])
        names = ", ".join(f"{name} ({entry['lost']} lost: {entry['reasons'][0]})" for name, entry in worst[:10])
        more = f" and {len(worst) - 10} more" if len(worst) > 10 else ""
        return (f"data.max_bad_fraction: {lost} of {read + lost} samples read so far were lost "
                f"({lost / max(read + lost, 1):.1%} > {self.max_bad_fraction:.1%}); bad shards: {names}{more} "
                f"(all listed in the MLflow artifact {'/'.join(REPORT_ARTIFACT)})")

    def _merge(self, item: Lost) -> None:
        entry = self.shards.setdefault(item.shard, {"lost": 0, "reasons": [], "keys": []})
        entry["lost"] += item.count
        if item.reason not in entry["reasons"] and len(entry["reasons"]) < _REASONS_PER_SHARD:
            entry["reasons"].append(item.reason)
        if item.key and len(entry["keys"]) < _KEYS_PER_SHARD:
            entry["keys"].append(item.key)

    def _log_keys(self, keys: list[str]) -> None:
        os.makedirs(os.path.dirname(self.key_log), exist_ok=True)
        with open(self.key_log, "a") as handle:
            handle.write(json.dumps({"rank": self.rank, "node": _node_id(), "keys": list(keys)}) + "\n")


def _node_id() -> str:
    """The Ray node this process runs on ('' outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except ImportError:
        return ""

