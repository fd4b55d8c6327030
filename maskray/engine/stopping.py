"""Stopping a run on request: SIGTERM to the driver or to a training worker checkpoints, then exits cleanly.

Two sources, one decision. The driver's SIGTERM handler sets a :class:`~maskray.engine.driver_stop.StopRequest`
(a small named Ray actor that the driver owns, :mod:`maskray.engine.driver_stop`); rank 0 polls it without
blocking. A worker's own SIGTERM (its node is going away) sets a flag in that worker's process: Ray's handler,
which exits the worker at once, is replaced by one that only records the signal (:func:`install_worker_sigterm`,
run on the worker actor's main thread, the only one that may set signal handlers). After every optimizer step
the ranks all-reduce both flags (:meth:`StopSignal.poll`), so all of them stop at the same step: they save a
checkpoint there, and then

- on the driver's request the training function returns and the driver exits with one line (re-submitting
  the run name resumes it);
- on a worker's SIGTERM it raises :class:`WorkerTerminated`, and Ray Train restarts the worker group from that
  checkpoint (``scaling.max_failures``), on another node if this one is gone.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

from maskray.engine.driver_stop import DRIVER_REQUEST

logger = logging.getLogger(__name__)

_WORKER_SIGTERM = threading.Event()  # set in this worker process by its SIGTERM handler


class WorkerTerminated(RuntimeError):
    """A training worker received SIGTERM; the group checkpointed and Ray Train restarts it."""


def _record_sigterm(signum, frame) -> None:
    _WORKER_SIGTERM.set()


def _install_record_sigterm() -> None:
    signal.signal(signal.SIGTERM, _record_sigterm)


def install_worker_sigterm() -> None:
    """Make SIGTERM to this Ray Train worker process record the signal instead of exiting: run on the worker
    actor's main thread (Ray Train's ``RayTrainWorker.execute``) from the training thread. Without that method
    (another Ray version) the worker keeps Ray's handler, with a warning: a SIGTERM then kills it like any
    lost worker, and the run restarts from its previous checkpoint."""
    import ray

    _WORKER_SIGTERM.clear()
    try:
        ray.get(ray.get_runtime_context().current_actor.execute.remote(_install_record_sigterm))
    except Exception as exc:  # noqa: BLE001 - any failure leaves Ray's default, which is safe
        logger.warning("SIGTERM to a worker will not checkpoint first (%s: %s)", type(exc).__name__, exc)


class StopSignal:
    """The training loop's view of both stop sources; :meth:`poll` is a collective (every rank, every step)."""

    def __init__(self, request_name: str | None, rank: int, device: torch.device) -> None:
        import ray

        self.device = device
        self.actor = ray.get_actor(request_name) if request_name and rank == 0 else None
        self.pending = self.actor.get.remote() if self.actor else None

    def _driver_requested(self) -> bool:
        """Rank 0: whether the driver asked to stop, without waiting (one poll in flight at a time)."""
        import ray

        if self.pending is None:
            return False
        ready, _ = ray.wait([self.pending], timeout=0)
        if not ready:
            return False
        requested = ray.get(self.pending) is not None
        self.pending = None if requested else self.actor.get.remote()
        return requested

    def poll(self) -> str | None:
        """``None`` to go on, else why every rank stops now: :data:`DRIVER_REQUEST` or a worker's SIGTERM."""
        flags = torch.tensor([float(self._driver_requested()), float(_WORKER_SIGTERM.is_set())], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        driver, worker = flags.tolist()
        if driver:
            return DRIVER_REQUEST
        return "SIGTERM to a training worker" if worker else None
