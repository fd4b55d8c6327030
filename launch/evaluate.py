"""Evaluate a pretrained encoder (k-NN, linear probe, diagnostics, optionally fine-tuning) as a Ray task; log
into its MLflow run.

    python launch/evaluate.py --run-id ID | --checkpoint DIR [--tracking-uri URI] [--only knn,linear_probe,...]
        [--train-shards DIR --test-shards DIR] [--probe-epochs N] [--probe-blr LR] [--diag-images N]
        [--finetune] [--finetune-epochs N] [--finetune-blr LR] [--finetune-batch-size N]
        [--finetune-labels-per-class N]

``--run-id`` evaluates the run's latest checkpoint; ``--checkpoint`` a checkpoint directory (its run is found by
the Ray run name, or created once). Metrics go on the run itself and on one nested run per evaluation; running
it again updates them. Without a cluster a local Ray starts. The last line printed is ``mlflow_run_id=<id>``.
"""

from __future__ import annotations

import argparse

from maskray.cli import run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", help="MLflow run of a pretraining run")
    parser.add_argument("--checkpoint", help="checkpoint directory (encoder.safetensors + model.json)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--only", default="knn,linear_probe,diagnostics",
                        help="comma-separated evaluations (default: %(default)s)")
    parser.add_argument("--train-shards", help="labelled shards for the k-NN bank / probe training (eval.train_shards)")
    parser.add_argument("--test-shards", help="labelled shards for the queries / probe test (eval.test_shards)")
    parser.add_argument("--probe-epochs", type=int, default=90,
                        help="linear-probe epochs, the first epochs/9 (at most 10) warm up (MAE: 90, 10)")
    parser.add_argument("--probe-blr", type=float, default=0.1, help="linear-probe base lr, lr = blr * batch / 256")
    parser.add_argument("--diag-images", type=int, default=64, help="images the diagnostics average over")
    parser.add_argument("--finetune", action="store_true",
                        help="also fine-tune end to end (optional evaluation 'finetune'; or name it in --only)")
    parser.add_argument("--finetune-epochs", type=int, default=15,
                        help="fine-tuning epochs, the first epochs/7 warm up (default: %(default)s)")
    parser.add_argument("--finetune-blr", type=float, default=1e-3, help="fine-tuning base lr, lr = blr * batch / 256")
    parser.add_argument("--finetune-batch-size", type=int, default=64, help="fine-tuning batch (default: %(default)s)")
    parser.add_argument("--finetune-labels-per-class", type=int,
                        help="fine-tune on this many labelled images per class (default: all)")
    args = parser.parse_args()

    from maskray.eval.diagnostics import METRIC_PREFIXES
    from maskray.eval.finetune import FinetuneConfig
    from maskray.eval.linear_probe import LinearProbeConfig
    from maskray.eval.runner import EvalSettings, evaluate, resolve_target

    target = resolve_target(args.tracking_uri, args.run_id, args.checkpoint)
    kinds = tuple(kind.strip() for kind in args.only.split(",") if kind.strip())
    if args.finetune and "finetune" not in kinds:
        kinds += ("finetune",)
    settings = EvalSettings(
        kinds=kinds,
        probe=LinearProbeConfig(epochs=args.probe_epochs, warmup_epochs=min(10, args.probe_epochs // 9),
                                blr=args.probe_blr),
        finetune=FinetuneConfig(epochs=args.finetune_epochs, warmup_epochs=args.finetune_epochs // 7,
                                blr=args.finetune_blr, batch_size=args.finetune_batch_size,
                                labels_per_class=args.finetune_labels_per_class),
        diag_images=args.diag_images,
        train_shards=args.train_shards,
        test_shards=args.test_shards,
    )
    metrics = evaluate(target, settings)
    print(f"evaluated {target.checkpoint} (step {target.step})")
    for key in sorted(metrics):
        if not key.startswith("diag_"):
            print(f"  {key:30s} {metrics[key]:.2f}")
    for prefix in METRIC_PREFIXES.values():
        layers = sorted((int(key[len(prefix):]), value) for key, value in metrics.items() if key.startswith(prefix))
        if layers:
            print(f"  {prefix + '<layer>':30s} " + " ".join(f"l{layer}={value:.3g}" for layer, value in layers))
    print(f"mlflow_run_id={target.run_id}")
    return 0


if __name__ == "__main__":
    run_cli(main)
