"""Pretrain a ViT with a masked objective on Ray Train + DeepSpeed.

    python launch/pretrain.py --config configs/demo/mae.yaml [--set key=value ...] [--run-name NAME]
        [--experiment NAME] [--max-steps N] [--workers N]
    python launch/pretrain.py --list-objectives | --list-backbones

Without a cluster a local Ray starts; under ``ray job submit`` the job attaches to the cluster. Re-running
with the same ``--run-name`` resumes it. On success the last line printed is ``mlflow_run_id=<id>``. SIGTERM
checkpoints at the next step and exits with one line and code 143 (re-submit the run name to resume); a run
stopped by ``train.max_bad_batches`` exits with code 1; bad input exits with code 2 before any worker starts.
``--list-objectives`` prints every registered objective (plugins included) with its config keys, defaults and
bounds; ``--list-backbones`` the timm archs ``model.arch`` accepts; neither starts Ray.
"""

from __future__ import annotations

import argparse

from maskray.cli import run_cli
from maskray.config import load_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (omit for all defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.blr=1e-3 (repeatable)")
    parser.add_argument("--run-name", help="unique run name; re-using one resumes that run")
    parser.add_argument("--experiment", help="MLflow experiment (tracking.experiment)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke tests)")
    parser.add_argument("--workers", type=int, help="number of Ray Train workers (scaling.workers)")
    parser.add_argument("--list-objectives", action="store_true",
                        help="print every registered objective with its config keys, defaults and bounds, then exit")
    parser.add_argument("--list-backbones", action="store_true",
                        help="print the timm archs that model.arch accepts, then exit")
    args = parser.parse_args()
    if args.list_objectives or args.list_backbones:
        from maskray.catalog import backbones_text, objectives_text

        texts = [objectives_text()] if args.list_objectives else []
        texts += [backbones_text()] if args.list_backbones else []
        print("\n\n".join(texts))
        return 0
    overrides = list(args.overrides)
    if args.experiment:
        overrides.append(f"tracking.experiment={args.experiment}")
    if args.workers:
        overrides.append(f"scaling.workers={args.workers}")
    config = load_config(args.config, overrides)

    import ray

    from maskray.engine.driver import run_pretraining, summary_lines

    try:
        result = run_pretraining(config, run_name=args.run_name, max_steps=args.max_steps)
    finally:
        ray.shutdown()  # stop forwarding worker logs, so the summary (or the error line) is the last thing printed
    print("\n".join(summary_lines(result)), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
