"""Compare the runs of an MLflow experiment side by side: a table on stdout and one comparison figure.

    python launch/compare.py --experiment NAME [--filter "tags.objective = 'msn'"] [--sort knn_top1]
        [--ascending] [--parent SWEEP_RUN_ID] [--params KEY,...] [--out comparison.png] [--tracking-uri URI] [--no-log]

Top-level training runs and sweep trials are compared; ``--parent`` keeps one sweep's trials only, ``--params``
adds a column per run param (e.g. the sweep's grid keys).

The figure (loss over steps and over wall time, k-NN over training time, diagnostics over layers) is written
to ``--out`` and, unless ``--no-log``, logged with the table into a comparison run of the same experiment.
"""

from __future__ import annotations

import argparse

from maskray.cli import run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--filter", dest="filter_string", help="MLflow search filter, e.g. \"tags.objective = 'mae'\"")
    parser.add_argument("--sort", default="knn_top1", help="column or metric to sort by (default: %(default)s)")
    parser.add_argument("--ascending", action="store_true", help="smallest first (default: largest first)")
    parser.add_argument("--parent", help="only the trials of this sweep run (launch/sweep.py prints sweep_run_id)")
    parser.add_argument("--params", default="", help="comma-separated run params to show as columns")
    parser.add_argument("--out", default="comparison.png", help="figure file (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--no-log", action="store_true", help="do not log the figure into a comparison run")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from maskray.config import TrackingConfig
    from maskray.tracking.compare import compare_runs, comparison_figure, format_table, log_comparison

    uri = args.tracking_uri or TrackingConfig().resolved_uri()
    rows = compare_runs(uri, args.experiment, args.filter_string, args.sort, args.ascending, args.parent)
    table = format_table(rows, tuple(key for key in args.params.split(",") if key))
    print(table)
    figure = comparison_figure(MlflowClient(uri), rows, args.out)
    print(f"figure: {figure}")
    if not args.no_log:
        selection = " and ".join(filter(None, [args.filter_string, args.parent and f"parent run {args.parent}"]))
        run_id = log_comparison(uri, args.experiment, rows, figure, table, selection or None)
        print(f"comparison_run_id={run_id}")
    return 0


if __name__ == "__main__":
    run_cli(main)
