"""Side-by-side comparison of the runs of one MLflow experiment: a table, one figure, a comparison run.

Training runs are compared: top-level ones and the trials of a sweep (nested under the sweep's run, tag
``maskray.sweep``); nested evaluation runs (tag ``mlflow.parentRunId``, no ``maskray.sweep``), sweep runs and
comparison runs (tag ``maskray.kind``) are skipped. ``parent_run_id`` narrows the comparison to one sweep's trials.
Table columns: objective, backbone and dataset (run tags), steps (last step of the ``loss`` history), images/s and
final loss (latest ``images_per_s`` / ``loss``), k-NN and linear-probe top-1 (latest ``knn_top1`` /
``linear_top1``), wall time (``end_time - start_time``; now - start for a run still running). Works with any store
``MlflowClient`` talks to (the embedded SQLite file or a tracking server): everything is read through the client
API.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from maskray.errors import ConfigError
from maskray.tracking.mlflow_run import RUN_NAME_TAG

KIND_TAG = "maskray.kind"
COMPARE_KEY_TAG = "maskray.compare_key"
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "maskray.sweep"
NUMERIC_COLUMNS = ("steps", "images_per_s", "final_loss", "knn_top1", "linear_top1", "wall_time_s")
DIAGNOSTICS = (
    ("diag_attn_dist_l", "attention distance (px)"),
    ("diag_nmi_l", "NMI"),
    ("diag_fourier_l", "delta log amplitude"),
)


@dataclass
class RunRow:
    """One compared run: the table's columns plus what the figure needs (latest metrics, loss history)."""

    run_id: str
    name: str
    objective: str
    backbone: str
    dataset: str
    steps: int | None
    images_per_s: float | None
    final_loss: float | None
    knn_top1: float | None
    linear_top1: float | None
    wall_time_s: float | None
    start_time: int
    metrics: dict[str, float] = field(default_factory=dict)
    loss_history: list[Metric] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)

    def value(self, key: str) -> float | None:
        """A numeric column (``NUMERIC_COLUMNS``) or else the latest value of metric ``key``."""
        return getattr(self, key) if key in NUMERIC_COLUMNS else self.metrics.get(key)


def store_exists(tracking_uri: str) -> bool:
    """False for a SQLite store whose file does not exist (MlflowClient would silently create an empty one)."""
    return not tracking_uri.startswith("sqlite:///") or Path(tracking_uri[len("sqlite:///") :]).is_file()


def check_store(tracking_uri: str) -> None:
    if not store_exists(tracking_uri):
        raise ConfigError(f"tracking store '{tracking_uri}' does not exist (pass --tracking-uri)")


def open_experiment(tracking_uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client of the store and the id of ``experiment``; a ConfigError naming what is missing."""
    check_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"--experiment: no experiment named '{experiment}' in {tracking_uri}")
    return client, found.experiment_id


def _row(client: MlflowClient, run: Run) -> RunRow:
    info, tags, metrics = run.info, run.data.tags, run.data.metrics
    loss = sorted(client.get_metric_history(info.run_id, "loss"), key=lambda metric: (metric.step, metric.timestamp))
    end = info.end_time or (int(time.time() * 1000) if info.status == "RUNNING" else None)
    return RunRow(
        run_id=info.run_id,
        name=tags.get(RUN_NAME_TAG) or info.run_name or info.run_id,
        objective=tags.get("objective", "-"),
        backbone=tags.get("backbone", "-"),
        dataset=tags.get("dataset", "-"),
        steps=loss[-1].step if loss else None,
        images_per_s=metrics.get("images_per_s"),
        final_loss=metrics.get("loss"),
        knn_top1=metrics.get("knn_top1"),
        linear_top1=metrics.get("linear_top1"),
        wall_time_s=(end - info.start_time) / 1000 if end else None,
        start_time=info.start_time,
        metrics=dict(metrics),
        loss_history=loss,
        params=dict(run.data.params),
    )


def compare_runs(
    tracking_uri: str,
    experiment: str,
    filter_string: str | None = None,
    sort_by: str = "knn_top1",
    ascending: bool = False,
    parent_run_id: str | None = None,
) -> list[RunRow]:
    """Rows of the experiment's training runs matching ``filter_string`` (MLflow search syntax), sorted by
    ``sort_by`` (a numeric column or any metric; runs without it come last). With ``parent_run_id`` only the
    trials of that sweep run."""
    client, experiment_id = open_experiment(tracking_uri, experiment)
    query = " and ".join(filter(None, [filter_string, parent_run_id and f"tags.`{PARENT_TAG}` = '{parent_run_id}'"]))
    runs: list[Run] = []
    token = None
    try:
        while True:
            page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    except MlflowException as err:
        raise ConfigError(f"--filter {filter_string!r}: {err.message.splitlines()[0]}") from None
    rows = [_row(client, run) for run in runs if _is_training_run(run.data.tags)]
    if rows and sort_by not in NUMERIC_COLUMNS and all(row.value(sort_by) is None for row in rows):
        raise ConfigError(f"--sort: '{sort_by}' is neither a column {NUMERIC_COLUMNS} nor a metric of these runs")
    present = sorted((row for row in rows if row.value(sort_by) is not None), key=lambda row: row.value(sort_by))
    missing = [row for row in rows if row.value(sort_by) is None]
    return (present if ascending else present[::-1]) + missing


def _is_training_run(tags: dict[str, str]) -> bool:
    """A top-level training run or a sweep's trial; not an evaluation, sweep or comparison run."""
    return KIND_TAG not in tags and (PARENT_TAG not in tags or SWEEP_TAG in tags)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[RunRow], params: tuple[str, ...] = ()) -> str:
    """A plain-text table, one line per run, in the order given; ``params`` adds a column per run param (e.g.
    a sweep's grid keys) after the run name."""
    header = ("run", *params, "objective", "backbone", "dataset", "steps", "img/s", "final loss", "k-NN top-1",
              "linear top-1", "wall time")
    lines = [header]
    for row in rows:
        lines.append((
            row.name, *(row.params.get(key, "-") for key in params), row.objective, row.backbone, row.dataset,
            "-" if row.steps is None else str(row.steps),
            _number(row.images_per_s, 0), _number(row.final_loss, 4), _number(row.knn_top1, 2),
            _number(row.linear_top1, 2), _duration(row.wall_time_s),
        ))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def _training_minutes(row: RunRow, step: int, timestamp: int) -> float:
    """Training time (minutes since the run started) at ``step``: the time of the last loss point at or before
    it (so an evaluation logged later still sits at its step's time); 0 for step 0."""
    if step == 0:
        return 0.0
    before = [metric.timestamp for metric in row.loss_history if metric.step <= step]
    return ((before[-1] if before else timestamp) - row.start_time) / 60000


def _layer_curve(metrics: dict[str, float], prefix: str) -> tuple[list[int], list[float]]:
    points = sorted(
        (int(match.group(1)), value)
        for key, value in metrics.items()
        if (match := re.fullmatch(re.escape(prefix) + r"(\d+)", key))
    )
    return [layer for layer, _ in points], [value for _, value in points]


def comparison_figure(client: MlflowClient, runs: list[RunRow], path: str | Path) -> Path:
    """Write one PNG: loss vs step, loss vs wall time, k-NN top-1 vs training time (hollow marker: random
    init), and the diagnostics over layers (attention distance, NMI, Fourier) when runs have them."""
    figure = Figure(figsize=(13, 9))
    grid = figure.add_gridspec(2, 2, hspace=0.35)
    loss_step, loss_time, knn = (figure.add_subplot(grid[index]) for index in ((0, 0), (0, 1), (1, 0)))
    diag_grid = grid[1, 1].subgridspec(1, len(DIAGNOSTICS), wspace=0.5)
    diag_axes = [figure.add_subplot(diag_grid[0, index]) for index in range(len(DIAGNOSTICS))]
    has_diagnostics = False
    for index, row in enumerate(runs):
        style = {"color": f"C{index % 10}", "label": f"{row.name} ({row.objective})"}
        values = [metric.value for metric in row.loss_history]
        loss_step.plot([metric.step for metric in row.loss_history], values, **style)
        loss_time.plot([(metric.timestamp - row.start_time) / 60000 for metric in row.loss_history], values, **style)
        history = sorted(client.get_metric_history(row.run_id, "knn_top1"), key=lambda metric: metric.timestamp)
        latest = {metric.step: metric for metric in history}  # a re-evaluation replaces its step's value
        points = sorted((_training_minutes(row, step, point.timestamp), point.value) for step, point in latest.items())
        if "knn_top1_random_init" in row.metrics:
            points.insert(0, (0.0, row.metrics["knn_top1_random_init"]))
            knn.scatter([0.0], [points[0][1]], s=60, facecolors="white", edgecolors=style["color"], zorder=3)
        if points:
            knn.plot(*zip(*points, strict=True), marker="o", **style)
        for axis, (prefix, _) in zip(diag_axes, DIAGNOSTICS, strict=True):
            layers, curve = _layer_curve(row.metrics, prefix)
            if layers:
                has_diagnostics = True
                axis.plot(layers, curve, marker=".", **style)
    for axis, (xlabel, title) in (
        (loss_step, ("optimizer step", "training loss")),
        (loss_time, ("wall time (min)", "training loss")),
        (knn, ("training time (min)", "k-NN top-1 (%)")),
    ):
        axis.set_xlabel(xlabel)
        axis.set_title(title)
        axis.grid(alpha=0.3)
    for axis, (_, title) in zip(diag_axes, DIAGNOSTICS, strict=True):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("layer")
        axis.grid(alpha=0.3)
        if not has_diagnostics:
            axis.text(0.5, 0.5, "no diagnostics\nlogged", ha="center", va="center", transform=axis.transAxes)
    if runs:
        loss_step.legend(fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110, bbox_inches="tight")
    return out


def log_comparison(
    tracking_uri: str,
    experiment: str,
    runs: list[RunRow],
    figure_path: str | Path,
    table: str,
    filter_string: str | None = None,
) -> str:
    """Log the figure (``comparison.png``) and the table (``comparison.txt``) as artifacts of the experiment's
    comparison run for this filter (tag ``maskray.kind = comparison``), created once and updated afterwards."""
    client, experiment_id = open_experiment(tracking_uri, experiment)
    key = hashlib.sha1((filter_string or "").encode()).hexdigest()[:12]
    query = f"tags.`{KIND_TAG}` = 'comparison' and tags.`{COMPARE_KEY_TAG}` = '{key}'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        name = f"comparison [{filter_string}]" if filter_string else "comparison"
        tags = {KIND_TAG: "comparison", COMPARE_KEY_TAG: key, "maskray.compare_filter": filter_string or ""}
        run_id = client.create_run(experiment_id, run_name=name[:250], tags=tags).info.run_id
    client.set_tag(run_id, "maskray.compared_runs", ",".join(row.run_id for row in runs)[:5000])
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "comparison.png").write_bytes(Path(figure_path).read_bytes())
        Path(tmp, "comparison.txt").write_text(table + "\n")
        client.log_artifacts(run_id, tmp)
    client.set_terminated(run_id, "FINISHED")
    return run_id
