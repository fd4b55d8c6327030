"""Embed an image folder or a shard directory with a pretrained encoder into a Parquet file, as a Ray task.

    python launch/embed.py --run-id ID | --checkpoint DIR | --weights FILE --data FOLDER_OR_SHARDS
        --out embeddings.parquet [--overwrite] [--batch-size N] [--tracking-uri URI] [--mean M ...] [--std S ...]

One row per image: ``id`` (relative file name, or the sample key for shards), ``label`` (-1: none),
``class_name`` (when known), ``cls`` and ``mean`` (the CLS token and the mean of the patch tokens after the final
norm, float32 lists of width D). Images go through the run's eval transform; with ``--weights`` (a file from
``launch/export.py``) through the export's size with ``--mean``/``--std`` (default 0.5 per channel, maskray's
default ``data.mean``/``data.std``). An existing ``--out`` is refused unless ``--overwrite``. Without a cluster
a local Ray starts.
"""

from __future__ import annotations

import argparse

from maskray.cli import run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="MLflow run of a pretraining run (its latest checkpoint)")
    source.add_argument("--checkpoint", help="checkpoint directory (encoder.safetensors + model.json)")
    source.add_argument("--weights", help="a .safetensors file written by launch/export.py")
    parser.add_argument("--data", required=True, help="image folder (recursive, class subfolders) or shard directory")
    parser.add_argument("--out", required=True, help="output .parquet file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--mean", type=float, nargs="+", help="with --weights: normalisation mean (default: 0.5 ...)")
    parser.add_argument("--std", type=float, nargs="+", help="with --weights: normalisation std (default: 0.5 ...)")
    args = parser.parse_args()

    from maskray.eval.embed import embed

    result = embed(args.out, args.data, run_id=args.run_id, checkpoint=args.checkpoint, weights=args.weights,
                   tracking_uri=args.tracking_uri, mean=args.mean, std=args.std, batch_size=args.batch_size,
                   overwrite=args.overwrite)
    print(f"wrote {result.rows} rows (cls and mean, D={result.dim}) to {result.path} in {result.seconds:.1f} s "
          f"({result.rows / max(result.seconds, 1e-9):.0f} images/s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
