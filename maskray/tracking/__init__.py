"""MLflow tracking: the driver owns the run (create or find, params, tags, status); rank 0 logs into it."""

from maskray.tracking.mlflow_run import (
    RunLogger,
    artifact_root_for,
    check_server,
    ensure_experiment,
    find_or_create_run,
    finish_run,
    run_metrics,
    run_url_hint,
    server_answers,
    usable_tracking_uri,
)
from maskray.tracking.redact import redact_params

__all__ = [
    "RunLogger",
    "artifact_root_for",
    "check_server",
    "ensure_experiment",
    "find_or_create_run",
    "finish_run",
    "redact_params",
    "run_metrics",
    "run_url_hint",
    "server_answers",
    "usable_tracking_uri",
]
