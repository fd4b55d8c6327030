"""Rank 0's MLflow metrics, logged so that a restart never logs a step twice.

MLflow's metric history is append-only, and a run restarts from its latest checkpoint: after a lost worker
(Ray Train restarts the group), a preemption or a killed driver (the run is re-submitted), the steps after that
checkpoint are trained again. Two rules keep every ``(metric, step)`` in the history once:

- **held until checkpointed**: metrics are kept on rank 0 and written once Ray Train has taken the checkpoint
  that covers their step (the worker loop reports it, then waits for the controller to take it, then calls
  :meth:`HeldMetrics.flush`), so the history is that of the weights that survive. The console line stays
  live; MLflow is updated every ``train.checkpoint_every`` steps.
- **never below what is logged**: at start (every attempt) the last logged step of each metric is read from
  the run, and a held value at or below it is dropped. This covers what the first rule cannot: a worker or
  the driver dying between the checkpoint being taken and the flush, or between the write of a checkpoint
  and its registration when no wait is possible.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only rank 0 holds a logger: the other ranks never import MLflow
    from maskray.tracking import RunLogger


def last_logged_steps(logger: RunLogger) -> dict[str, int]:
    """``{metric: highest step logged}`` for every metric of the run; empty, with a warning, when the tracking
    store cannot be read (training goes on; only the second rule of this module is then off)."""
    try:
        keys = logger.client.get_run(logger.run_id).data.metrics
        return {key: max(step for step, _ in logger.metric_history(key)) for key in keys}
    except Exception as exc:  # noqa: BLE001 - any tracking failure: warn and train on
        logging.getLogger(__name__).warning(
            "cannot read the logged steps of MLflow run %s (%s: %s); a restart may log a step again",
            logger.run_id, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return {}


class HeldMetrics:
    """Metrics of rank 0 between two checkpoints; :meth:`flush` writes those not yet in the run."""

    def __init__(self, logger: RunLogger) -> None:
        self.logger = logger
        self.logged = last_logged_steps(logger)
        self.pending: list[tuple[int, dict[str, float]]] = []

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        self.pending.append((step, dict(metrics)))

    def flush(self) -> None:
        """Log what is held, in order, except values at or below a metric's last logged step."""
        for step, metrics in self.pending:
            fresh = {key: value for key, value in metrics.items() if step > self.logged.get(key, -1)}
            if fresh:
                self.logger.log_metrics(fresh, step)
                self.logged.update(dict.fromkeys(fresh, step))
        self.pending.clear()
