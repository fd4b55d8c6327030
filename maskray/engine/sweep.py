"""Grid sweeps on Ray Tune: every combination of ``--grid key=v1,v2,...`` is one Tune trial that trains through
:func:`maskray.engine.driver.run_pretraining` (the same TorchTrainer path as ``launch/pretrain.py``).

The driver validates every combination before any trial starts, creates the sweep's parent MLflow run (named
after the sweep, tag ``maskray.kind = sweep``, the grid as ``grid.<key>`` params) and runs the trials. Trial ``i``
is the MLflow run ``<sweep>-<i>`` of the same experiment, tagged ``mlflow.parentRunId = <parent>`` and
``maskray.sweep = <sweep>``, with its whole config as params. A failing trial ends FAILED and the others go on.
At the end the trials' comparison table and figure are logged to the parent, which ends FINISHED unless every
trial failed.

Resources: a trial's own function only drives its Train run and reserves no CPU (``TRIAL_RESOURCES``); its Ray
Train workers request ``scaling.workers x scaling.cpus_per_worker`` CPUs (and a GPU each when used), so
``max_concurrent`` defaults to how many trials the cluster holds at once. (Tune's default of 1 CPU per trial
would, on a 2-CPU machine, leave one trial's driver holding a CPU that its own workers wait for.)
"""

from __future__ import annotations

import itertools
import math
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from maskray.config import Config, load_config
from maskray.engine.driver import run_pretraining, storage_location
from maskray.errors import ConfigError, MaskrayError
from maskray.ray_env import ensure_ray
from maskray.run_spec import build_run_spec
from maskray.tracking import find_or_create_run, finish_run
from maskray.tracking.compare import KIND_TAG, PARENT_TAG, SWEEP_TAG, compare_runs, comparison_figure, format_table
from maskray.tracking.mlflow_run import find_run

GRID_PARAM_PREFIX = "grid."
TRIAL_TAG = "maskray.sweep_trial"
# A trial's function only drives its Train run: no CPU (Tune refuses an empty request, so one byte of Ray's
# memory resource stands in).
TRIAL_RESOURCES = {"cpu": 0, "memory": 1}
_SHARED_KEYS = ("tracking.uri", "tracking.experiment", "tracking.storage_path")


@dataclass(frozen=True)
class Trial:
    """One grid combination: its index, MLflow/Ray run name, ``--grid`` assignment and validated config (JSON)."""

    index: int
    run_name: str
    assignment: dict[str, str]
    config: dict[str, Any]

    def describe(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.assignment.items())


@dataclass
class SweepResult:
    parent_run_id: str
    table: str
    figure: Path
    finished: list[Trial]
    failed: list[tuple[Trial, str]]


def default_sweep_name() -> str:
    return f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["a.b=1,2", "c=x,y"]`` -> ``{"a.b": ["1", "2"], "c": ["x", "y"]}`` (raw YAML values, as ``--set`` takes
    them); commas inside ``[...]`` or ``{...}`` do not split, so ``data.mean=[0.5],[0.4]`` is two values."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid {spec!r}: expected key=value1,value2,...")
        values = _split_values(raw)
        if any(not value for value in values):
            raise ConfigError(f"--grid {key}: empty value in {raw!r}")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        if len(set(values)) < len(values):
            raise ConfigError(f"--grid {key}: repeated value in {raw!r}")
        grid[key] = values
    if not grid:
        raise ConfigError("--grid: at least one key=value1,value2,... is needed")
    return grid


def _split_values(raw: str) -> list[str]:
    values, current, depth = [], [], 0
    for char in raw:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    values.append("".join(current).strip())
    return values


def plan_trials(
    config_path: str | None, overrides: Sequence[str], grid: Mapping[str, Sequence[str]], sweep: str
) -> tuple[Config, list[Trial]]:
    """The base config and one validated trial per combination (last key varies fastest).

    Each value is first checked on its own (the error names that ``--grid`` key and value), then every
    combination, configs and data (the error names the combination). Raises ConfigError / DataError.
    """
    base = load_config(config_path, overrides).resolved()
    for key, values in grid.items():
        for value in values:
            _trial_config(config_path, overrides, {key: value}, base)
    trials = []
    for index, combination in enumerate(itertools.product(*grid.values())):
        assignment = dict(zip(grid, combination, strict=True))
        config = _trial_config(config_path, overrides, assignment, base)
        trials.append(Trial(index, f"{sweep}-{index}", assignment, config.model_dump(mode="json")))
    return base, trials


def _trial_config(
    config_path: str | None, overrides: Sequence[str], assignment: Mapping[str, str], base: Config
) -> Config:
    where = "--grid " + " ".join(f"{key}={value}" for key, value in assignment.items())
    try:
        config = load_config(config_path, [*overrides, *(f"{key}={value}" for key, value in assignment.items())])
        config = build_run_spec(config).config
    except MaskrayError as err:
        raise type(err)(f"{where}: {err}") from None
    flat, shared = config.flat(), base.flat()
    for key in _SHARED_KEYS:
        if flat[key] != shared[key]:
            raise ConfigError(f"{where}: the trials of a sweep share {key} ({shared[key]!r})")
    return config


def default_concurrency(configs: Sequence[Config], resources: Mapping[str, float]) -> int:
    """How many trials the cluster ``resources`` (``ray.cluster_resources()``) run at once (at least 1)."""
    cpus = max(config.scaling.workers * config.scaling.cpus_per_worker for config in configs)
    limit = resources.get("CPU", 0) // cpus
    gpus = resources.get("GPU", 0)
    if gpus >= 1 and any(config.scaling.use_gpu is not False for config in configs):
        limit = min(limit, gpus // max(config.scaling.workers for config in configs))
    return max(1, int(limit))


def _run_trial(params: dict, *, trials: list[Trial], parent_run_id: str, sweep: str) -> dict[str, float]:
    """The Tune function trainable: trial ``params["trial"]`` as one pretraining run nested under the sweep."""
    trial = trials[params["trial"]]
    tags = {PARENT_TAG: parent_run_id, SWEEP_TAG: sweep, TRIAL_TAG: str(trial.index)}
    result = run_pretraining(Config.model_validate(trial.config), run_name=trial.run_name, tags=tags)
    return {"final_loss": result.metrics.get("loss", math.nan)}


def _create_parent(base: Config, trials: list[Trial], grid: Mapping[str, Sequence[str]], sweep: str) -> str:
    """The sweep's MLflow run; refuses a sweep or trial name the experiment already has."""
    uri, experiment = base.tracking.resolved_uri(), base.tracking.experiment
    client = MlflowClient(uri)
    for name in (sweep, *(trial.run_name for trial in trials)):
        if find_run(client, experiment, name) is not None:
            raise ConfigError(f"--name {sweep}: experiment '{experiment}' already has a run named '{name}'")
    params = {f"{GRID_PARAM_PREFIX}{key}": ",".join(values) for key, values in grid.items()}
    tags = {KIND_TAG: "sweep", SWEEP_TAG: sweep}
    run_id, _ = find_or_create_run(uri, experiment, sweep, {**params, "sweep.trials": len(trials)}, tags)
    return run_id


def run_sweep(
    base: Config,
    trials: list[Trial],
    grid: Mapping[str, Sequence[str]],
    sweep: str,
    figure_path: str | Path,
    max_concurrent: int | None = None,
    sort_by: str = "knn_top1",
) -> SweepResult:
    """Run ``trials`` (from :func:`plan_trials`) as Tune trials, then compare them into the parent run."""
    import ray
    from ray import tune

    uri = base.tracking.resolved_uri()
    filesystem, storage_path = storage_location(base.tracking.storage_path)
    parent_run_id = _create_parent(base, trials, grid, sweep)
    ok = False
    try:
        ensure_ray()
        configs = [Config.model_validate(trial.config) for trial in trials]
        concurrency = max_concurrent or default_concurrency(configs, ray.cluster_resources())
        trainable = tune.with_parameters(_run_trial, trials=trials, parent_run_id=parent_run_id, sweep=sweep)
        tuner = tune.Tuner(
            tune.with_resources(trainable, TRIAL_RESOURCES),
            param_space={"trial": tune.grid_search([trial.index for trial in trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=sweep, storage_path=storage_path, storage_filesystem=filesystem, verbose=0),
        )
        errors = {result.config["trial"]: result.error for result in tuner.fit()}
        failed = [(trial, _reason(errors[trial.index])) for trial in trials if errors.get(trial.index)]
        finished = [trial for trial in trials if not errors.get(trial.index)]
        rows = compare_runs(uri, base.tracking.experiment, sort_by=sort_by, parent_run_id=parent_run_id)
        table = format_table(rows, params=tuple(grid))
        figure = comparison_figure(MlflowClient(uri), rows, figure_path)
        _log_comparison(uri, parent_run_id, table, figure, failed)
        ok = bool(finished)
    finally:
        finish_run(uri, parent_run_id, ok)
    return SweepResult(parent_run_id, table, figure, finished, failed)


def _log_comparison(uri: str, run_id: str, table: str, figure: Path, failed: list[tuple[Trial, str]]) -> None:
    client = MlflowClient(uri)
    client.set_tag(run_id, "maskray.sweep_failed", ",".join(trial.run_name for trial, _ in failed))
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "comparison.png").write_bytes(figure.read_bytes())
        Path(tmp, "comparison.txt").write_text(table + "\n")
        client.log_artifacts(run_id, tmp)


def _reason(error: BaseException) -> str:
    """The last line of an error's text: the worker's exception, for a Ray error that carries its traceback."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
