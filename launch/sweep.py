"""Sweep a grid of config values with Ray Tune: one pretraining run per combination, compared at the end.

    python launch/sweep.py --config configs/demo/mae.yaml --grid objective.mask_ratio=0.6,0.75,0.9
        [--grid optim.blr=1e-3,2e-3 ...] [--set key=value ...] [--name NAME] [--experiment NAME]
        [--max-concurrent N] [--sort knn_top1] [--out sweep.png]

Every combination is validated before the first trial starts. Each trial is its own MLflow run (``<name>-<i>``)
nested under the sweep's run; a failed trial does not stop the others. Prints the comparison table of the
trials (one column per grid key), writes the figure to ``--out`` and logs both to the sweep's run. Exits 1 only
when every trial failed; the last line printed is ``sweep_run_id=<id>``.
"""

from __future__ import annotations

import argparse

from maskray.cli import run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (omit for all defaults)")
    parser.add_argument("--grid", action="append", default=[], required=True, metavar="KEY=V1,V2,...",
                        help="a config key and its values, e.g. objective.mask_ratio=0.6,0.75 (repeatable: the "
                             "sweep runs every combination)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every trial (repeatable)")
    parser.add_argument("--name", help="sweep name: the parent run; trials are <name>-0, <name>-1, ... "
                                       "(default: sweep-<date>-<time>)")
    parser.add_argument("--experiment", help="MLflow experiment (tracking.experiment)")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster's "
                                                           "CPUs/GPUs hold, scaling.workers x cpus_per_worker each)")
    parser.add_argument("--sort", default="knn_top1", help="column or metric to sort by (default: %(default)s)")
    parser.add_argument("--out", default="sweep.png", help="comparison figure (default: %(default)s)")
    args = parser.parse_args()
    if args.max_concurrent is not None and args.max_concurrent < 1:
        parser.error("--max-concurrent must be >= 1")

    from maskray.engine.sweep import default_sweep_name, parse_grid, plan_trials, run_sweep

    overrides = [*args.overrides, *([f"tracking.experiment={args.experiment}"] if args.experiment else [])]
    grid = parse_grid(args.grid)
    name = args.name or default_sweep_name()
    base, trials = plan_trials(args.config, overrides, grid, name)
    print(f"sweep {name}: {len(trials)} trials", flush=True)

    import ray

    result = run_sweep(base, trials, grid, name, args.out, args.max_concurrent, args.sort)
    ray.shutdown()  # stop forwarding worker logs, so the summary is the last thing printed
    print(result.table)
    print(f"figure: {result.figure}")
    for trial, error in result.failed:
        print(f"failed: {trial.run_name} ({trial.describe()}): {error}")
    print(f"{len(result.finished)} of {len(trials)} trials finished")
    print(f"sweep_run_id={result.parent_run_id}", flush=True)
    return 0 if result.finished else 1


if __name__ == "__main__":
    run_cli(main)
