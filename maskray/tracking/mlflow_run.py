"""MLflow run management without global state (``MlflowClient`` only), safe to use from Ray workers.

The driver creates the experiment and the run once, before any worker starts (SQLite stores race on
schema migration and experiment creation otherwise). A run is identified by the tag ``maskray.run_name``:
re-launching a run name resumes the same MLflow run instead of creating a duplicate. Rank 0 logs metrics
and figures with :class:`RunLogger`.
"""

from __future__ import annotations

import io
import os
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

RUN_NAME_TAG = "maskray.run_name"
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
    """Return ``(run_id, resumed)``: the run tagged with ``run_name`` if one exists, else a new one."""
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
    MlflowClient(tracking_uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


def run_url_hint(tracking_uri: str) -> str:
    """How a user opens the UI for this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


class RunLogger:
    """Logs into an existing run: metrics with a step, tags, and matplotlib figures as PNG artifacts."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(entries), _MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[start : start + _MAX_BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

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
            self.client.log_artifact(self.run_id, path, artifact_path)

    def log_file(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike) -> None:
        """Every file under ``directory`` as the run's artifacts (same relative paths)."""
        self.client.log_artifacts(self.run_id, str(directory))

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
