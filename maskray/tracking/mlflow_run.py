"""MLflow run management without global state (``MlflowClient`` only), safe to use from Ray workers.

The driver creates the experiment and the run once, before any worker starts (SQLite stores race on
schema migration and experiment creation otherwise). A run is identified by the tag ``maskray.run_name``:
re-launching a run name resumes the same MLflow run instead of creating a duplicate. Rank 0 logs metrics
and figures with :class:`RunLogger`.

A tracking server that does not answer never stops training. At the start the driver falls back to a local
SQLite store (:func:`usable_tracking_uri`, with a warning naming it); mid-run :class:`RunLogger` keeps what it
could not send (metrics with their original step and time, tags, artifacts) in memory and in a local fallback
directory (a warning names it once per outage) and sends it, in order, once the server answers again.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from maskray.errors import ConfigError
from maskray.tracking.redact import redact_params
from maskray.tracking.redact import redact_uri_credentials as _shown

logger = logging.getLogger(__name__)

RUN_NAME_TAG = "maskray.run_name"
FALLBACK_ENV = "MASKRAY_TRACKING_FALLBACK"  # where RunLogger keeps what the server did not take
_MAX_BATCH = 900  # MLflow accepts at most 1000 entities per log_batch


def artifact_root_for(tracking_uri: str) -> str | None:
    """For a local SQLite store, artifacts go to ``mlartifacts/`` next to the database; else server default."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///") :])
        return (database.parent / "mlartifacts").resolve().as_uri()
    return None


def check_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """For an ``http(s)://`` tracking URI, a ConfigError when nothing answers at ``<uri>/health`` within
    ``timeout`` seconds (MlflowClient would otherwise retry for minutes); other stores are not checked. Any
    HTTP answer, an error status included (a proxy asking for credentials), counts as reachable."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"tracking.uri: no MLflow server answers at {tracking_uri} ({reason}); start it or point tracking.uri "
            "/ MLFLOW_TRACKING_URI at a running one"
        ) from None


def server_answers(tracking_uri: str, timeout: float = 2.0) -> bool:
    """False when an ``http(s)://`` tracking URI does not answer at ``/health`` (any HTTP status counts as an
    answer); other stores (SQLite, files) always count as answering."""
    try:
        check_server(tracking_uri, timeout)
    except ConfigError:
        return False
    return True


def usable_tracking_uri(tracking_uri: str, fallback: str | os.PathLike) -> str:
    """``tracking_uri`` when it answers, else ``sqlite:///<fallback>`` (a local file) with a warning that names it:
    training goes on, tracked there."""
    if server_answers(tracking_uri, timeout=5.0):
        return tracking_uri
    local = f"sqlite:///{Path(fallback).resolve()}"
    logger.warning("no MLflow server answers at %s; this run is tracked in the local store %s instead "
                   "(see it with: mlflow ui --backend-store-uri %s)", _shown(tracking_uri), local, local)
    return local


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Return the id of experiment ``name``, creating it if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root_for(tracking_uri))


def find_run(client: MlflowClient, experiment: str, run_name: str) -> str | None:
    """The id of the run tagged ``maskray.run_name = run_name`` in ``experiment``, if any."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def find_or_create_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
) -> tuple[str, bool]:
    """Return ``(run_id, resumed)``: the run tagged with ``run_name`` if one exists, else a new one (its params and
    tags with credentials redacted, :func:`~maskray.tracking.redact.redact_params`)."""
    params, tags = redact_params(params), redact_params(tags)
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, tracking_uri)
    run_id = find_run(client, experiment, run_name)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    param_list = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(param_list), _MAX_BATCH):
        client.log_batch(run.info.run_id, params=param_list[start : start + _MAX_BATCH])
    return run.info.run_id, False


def finish_run(tracking_uri: str, run_id: str, ok: bool) -> None:
    """Mark the run FINISHED or FAILED; a server that does not answer only gets a warning."""
    if not server_answers(tracking_uri):
        logger.warning("no MLflow server answers at %s: run %s is not marked %s", _shown(tracking_uri), run_id,
                       "FINISHED" if ok else "FAILED")
        return
    MlflowClient(tracking_uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


def run_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    """The run's latest metrics; empty (with a warning) when the server does not answer."""
    if not server_answers(tracking_uri):
        logger.warning("no MLflow server answers at %s: the run's final metrics are not shown", _shown(tracking_uri))
        return {}
    return dict(MlflowClient(tracking_uri).get_run(run_id).data.metrics)


def run_url_hint(tracking_uri: str) -> str:
    """How a user opens the UI for this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def default_fallback_dir(run_id: str) -> Path:
    """``$MASKRAY_TRACKING_FALLBACK/<run_id>``, by default under ``~/.cache/maskray/mlflow-fallback``."""
    root = os.environ.get(FALLBACK_ENV) or Path.home() / ".cache" / "maskray" / "mlflow-fallback"
    return Path(root) / run_id


class RunLogger:
    """Logs into an existing run: metrics with a step, tags, files and matplotlib figures as PNG artifacts.

    Nothing raises when the server does not answer: what was not sent waits in ``pending`` (and in
    ``fallback_dir``: ``metrics.jsonl``, ``tags.json``, ``artifacts/``) and is sent, oldest first, by the next
    call after ``retry_every`` seconds that finds the server answering. A server that goes away during a call is
    retried ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` times (set to 2 here unless set) rather than for minutes.
    """

    def __init__(self, tracking_uri: str, run_id: str, fallback_dir: str | os.PathLike | None = None,
                 retry_every: float = 30.0) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.fallback_dir = Path(fallback_dir) if fallback_dir else default_fallback_dir(run_id)
        self.retry_every = retry_every
        self.pending: list[Metric] = []
        self.pending_tags: dict[str, str] = {}
        self.pending_files: list[tuple[Path, str | None]] = []  # (local copy, artifact path)
        self.history: dict[str, list[tuple[int, float]]] = {}  # what this logger logged, sent or not
        self.down = False
        self.next_try = 0.0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for entry in entries:
            self.history.setdefault(entry.key, []).append((step, entry.value))
        self.pending += entries
        if self.down:
            self._keep_metrics(entries)
        self.flush()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.pending_tags.update({key: str(value) for key, value in tags.items()})
        if self.down:
            self._keep_tags()
        self.flush()

    def log_figure(self, figure: Any, filename: str) -> None:
        """Save a matplotlib figure as ``filename`` (PNG) in the run's artifacts."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        self.log_bytes(buffer.getvalue(), filename)

    def log_bytes(self, data: bytes, filename: str, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, filename)
            with open(path, "wb") as handle:
                handle.write(data)
            self.log_file(path, artifact_path)

    def log_file(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log one file; while the server is away a copy waits under ``fallback_dir/artifacts``."""
        self.pending_files.append((Path(path), artifact_path))
        if self.flush():
            return
        copy = self.fallback_dir / "artifacts" / (artifact_path or "") / Path(path).name  # the caller's may go
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
        self.pending_files[-1] = (copy, artifact_path)

    def log_artifacts(self, directory: str | os.PathLike) -> None:
        """Every file under ``directory`` as the run's artifacts (same relative paths)."""
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                parent = path.parent.relative_to(directory).as_posix()
                self.log_file(path, None if parent == "." else parent)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """The server's history of ``key``; while it is away, what this logger logged."""
        if self.flush():
            return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
        return list(self.history.get(key, []))

    def flush(self) -> bool:
        """Send what is pending (metrics in logging order, tags, files); True when nothing is left."""
        if not (self.pending or self.pending_tags or self.pending_files):
            return True
        if self.down and time.monotonic() < self.next_try:
            return False
        try:
            if not server_answers(self.tracking_uri):
                raise ConnectionError("no answer at /health")
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:_MAX_BATCH])
                del self.pending[:_MAX_BATCH]
            if self.pending_tags:
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self.pending_tags.items()])
                self.pending_tags = {}
            while self.pending_files:
                path, artifact_path = self.pending_files[0]
                self.client.log_artifact(self.run_id, str(path), artifact_path)
                self.pending_files.pop(0)
        except Exception as exc:  # the server went away: keep everything for the next try
            self._outage(exc)
            return False
        if self.down:
            logger.warning("the MLflow server at %s answers again: sent what was kept in %s",
                           _shown(self.tracking_uri), self.fallback_dir)
            self.down = False
            shutil.rmtree(self.fallback_dir, ignore_errors=True)
        return True

    def _outage(self, exc: Exception) -> None:
        self.next_try = time.monotonic() + self.retry_every
        if self.down:
            return
        self.down = True
        self._keep_metrics(self.pending)
        self._keep_tags()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning("the MLflow server at %s does not answer (%s); training goes on: metrics, tags and artifacts "
                       "are kept in %s and sent when it answers again", _shown(self.tracking_uri), reason,
                       self.fallback_dir)

    def _keep_metrics(self, entries: list[Metric]) -> None:
        self.fallback_dir.mkdir(parents=True, exist_ok=True)
        with open(self.fallback_dir / "metrics.jsonl", "a") as handle:
            for m in entries:
                handle.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp,
                                         "step": m.step}) + "\n")

    def _keep_tags(self) -> None:
        if self.pending_tags:
            self.fallback_dir.mkdir(parents=True, exist_ok=True)
            (self.fallback_dir / "tags.json").write_text(json.dumps(self.pending_tags, indent=1))
