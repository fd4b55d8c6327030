"""A tracking server that goes away never stops training (:class:`maskray.tracking.RunLogger`, the driver's
fallback store): against a real ``mlflow server`` process on 127.0.0.1, stopped mid-run and restarted (never
started: test_init_from.py's launcher run)."""

from __future__ import annotations

import logging

import pytest
from helpers import free_port, start_mlflow_server, stop_process
from mlflow.tracking import MlflowClient

from maskray.tracking import RunLogger, find_or_create_run


@pytest.mark.slow
def test_metrics_tags_and_files_wait_while_the_server_is_down_and_arrive_once(tmp_path, caplog) -> None:
    root, port = tmp_path / "server", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    try:
        run_id, _ = find_or_create_run(uri, "outage", "run", {"a": 1}, {})
        logger = RunLogger(uri, run_id, fallback_dir=tmp_path / "fallback", retry_every=0.0)
        logger.log_metrics({"loss": 1.0}, 1)
        stop_process(server)

        with caplog.at_level(logging.WARNING, logger="maskray.tracking.mlflow_run"):
            logger.log_metrics({"loss": 2.0}, 2)
            logger.log_metrics({"loss": 3.0, "lr": 0.1}, 3)
            logger.set_tags({"phase": "down"})
            logger.log_bytes(b"report", "bad_samples.json", "data")
        warnings = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
        assert len(warnings) == 1 and str(tmp_path / "fallback") in warnings[0] and uri in warnings[0]
        kept = (tmp_path / "fallback" / "metrics.jsonl").read_text().splitlines()
        assert len(kept) == 3 and '"step": 2' in kept[0]
        assert (tmp_path / "fallback" / "artifacts" / "data" / "bad_samples.json").read_bytes() == b"report"
        assert logger.metric_history("loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]  # the logger's own, meanwhile

        server = start_mlflow_server(root, port)  # the same store comes back
        logger.log_metrics({"loss": 4.0}, 4)
        client = MlflowClient(uri)
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
            (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        assert [m.step for m in client.get_metric_history(run_id, "lr")] == [3]
        assert client.get_run(run_id).data.tags["phase"] == "down"
        assert [a.path for a in client.list_artifacts(run_id, "data")] == ["data/bad_samples.json"]
        assert not (tmp_path / "fallback").exists() and not logger.pending
    finally:
        stop_process(server)


# A run started with no server (the driver's fallback store) is test_init_from.py's launcher run.
