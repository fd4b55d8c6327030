"""Every objective's demo run at its full demo budget, side by side: k-NN, linear probe, images/s, wall time.

    python benchmarks/objectives.py [CONFIG ...] [--workers 2] [--steps N] [--out runs/bench-objectives]
        [--set KEY=VALUE ...] [--no-eval] [--table-only]

Each config (default: every ``configs/demo/*.yaml``) pretrains through ``launch/pretrain.py`` (Ray Train +
DeepSpeed, ``--workers`` workers) into one MLflow store under ``--out`` (experiment ``bench-objectives``), then
``launch/evaluate.py`` runs the linear probe and the diagnostics on the run's final checkpoint. ``--steps``
gives every config the same optimizer-step budget (default: each config's own ``train.steps``). Each finished
config writes ``<out>/<config stem>.json``; the table covers every JSON in ``<out>``, so configs benchmarked by
separate invocations (one at a time, on a quiet machine) end up in one table, next to MAE's row. Columns: k-NN
top-1 of the pretrained and of the random-init encoder and their difference, linear-probe top-1, median
images/s over the log windows, wall time of the pretraining job, final loss. After the table,
``launch/compare.py`` draws the comparison figure of all runs (loss, k-NN over steps and wall time,
diagnostics over layers) into ``<out>/comparison.png``. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "bench-objectives"


def run_launcher(script: str, *args: str) -> str:
    """Run ``launch/<script>``; returns the id from its last ``mlflow_run_id=`` line (RuntimeError if it fails)."""
    done = subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=None, text=True)
    ids = [line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("mlflow_run_id=")]
    if done.returncode or not ids:
        raise RuntimeError(f"launch/{script} {' '.join(args)} exited {done.returncode}:\n{done.stdout[-2000:]}")
    return ids[-1].strip()


def benchmark(config: Path, args: argparse.Namespace, uri: str) -> dict:
    """Pretrain ``config`` (and evaluate it unless ``--no-eval``); returns its row."""
    from mlflow.tracking import MlflowClient

    name = config.stem
    overrides = [f"tracking.uri={uri}", f"tracking.storage_path={args.out / 'checkpoints'}",
                 f"tracking.experiment={EXPERIMENT}", *([f"train.steps={args.steps}"] if args.steps else []),
                 *args.overrides]
    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.time()
    run_id = run_launcher("pretrain.py", "--config", str(config), "--workers", str(args.workers),
                          "--run-name", run_name, *[item for o in overrides for item in ("--set", o)])
    wall = time.time() - started
    if not args.no_eval:
        run_launcher("evaluate.py", "--run-id", run_id, "--tracking-uri", uri, "--only", "linear_probe,diagnostics")
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    metrics = run.data.metrics
    speeds = [m.value for m in client.get_metric_history(run_id, "images_per_s")]
    row = {
        "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
        "objective": run.data.params.get("objective.name", name),
        "run_id": run_id,
        "steps": int(run.data.params.get("train.steps", 0)),
        "knn_top1": metrics.get("knn_top1"),
        "knn_top1_random_init": metrics.get("knn_top1_random_init"),
        "linear_probe_top1": metrics.get("linear_top1"),
        "images_per_s": statistics.median(speeds) if speeds else None,
        "wall_s": round(wall, 1),
        "loss": metrics.get("loss"),
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={_cpus()}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if row["knn_top1"] is not None and row["knn_top1_random_init"] is not None:
        row["knn_gain"] = row["knn_top1"] - row["knn_top1_random_init"]
    (args.out / f"{name}.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def with_probe(row: dict, uri: str) -> dict:
    """``row`` with its linear-probe top-1 read from its MLflow run when the row has none (evaluated later)."""
    if row.get("linear_probe_top1") is None:
        from mlflow.tracking import MlflowClient

        row["linear_probe_top1"] = MlflowClient(uri).get_run(row["run_id"]).data.metrics.get("linear_top1")
    return row


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def table(rows: list[dict]) -> str:
    def cell(value, fmt="{:.2f}"):
        return "–" if value is None else fmt.format(value)

    head = "| config | steps | k-NN | random init | gain | linear probe | images/s | wall s | loss |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in sorted(rows, key=lambda r: r["config"]):
        lines.append(f"| {row['config']} | {row['steps']} | {cell(row['knn_top1'])} | "
                     f"{cell(row['knn_top1_random_init'])} | {cell(row.get('knn_gain'), '{:+.2f}')} | "
                     f"{cell(row['linear_probe_top1'])} | {cell(row['images_per_s'], '{:.0f}')} | "
                     f"{cell(row['wall_s'], '{:.0f}')} | {cell(row['loss'], '{:.4f}')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, help="demo configs (default: configs/demo/*.yaml)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="the same optimizer-step budget for every config")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-objectives", help="results folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--no-eval", action="store_true", help="skip the linear probe and diagnostics")
    parser.add_argument("--table-only", action="store_true", help="print the table of the JSONs in --out, run nothing")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.out / 'mlflow.db'}"
    configs = [c.resolve() for c in args.configs] or sorted((REPO / "configs" / "demo").glob("*.yaml"))
    if not args.table_only:
        for config in configs:
            row = benchmark(config, args, uri)
            print(f"{row['config']}: k-NN {row['knn_top1']} (random init {row['knn_top1_random_init']}), "
                  f"linear probe {row['linear_probe_top1']}, {row['wall_s']} s", flush=True)
    rows = [with_probe(json.loads(path.read_text()), uri) for path in sorted(args.out.glob("*.json"))]
    print(table(rows))
    if rows and not args.table_only:
        subprocess.run([sys.executable, str(REPO / "launch" / "compare.py"), "--experiment", EXPERIMENT,
                        "--tracking-uri", uri, "--out", str(args.out / "comparison.png")], cwd=REPO, check=False,
                       stdout=subprocess.DEVNULL)
    print(json.dumps({"benchmark": "objectives", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
