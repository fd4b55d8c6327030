"""Export a pretrained encoder as a timm-loadable safetensors file (logged to its MLflow run as well).

    python launch/export.py --run-id ID | --checkpoint DIR --out encoder.safetensors [--tracking-uri URI]

Prints the ``timm.create_model`` call that loads the file.
"""

from __future__ import annotations

import argparse

from maskray.cli import run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", help="MLflow run of a pretraining run (its latest checkpoint is exported)")
    parser.add_argument("--checkpoint", help="checkpoint directory (encoder.safetensors + model.json)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    args = parser.parse_args()

    from maskray.export import export_encoder

    result = export_encoder(args.out, args.run_id, args.checkpoint, args.tracking_uri)
    print(f"wrote {result.path} from {result.checkpoint}")
    print(f"load it with: {result.create_model_call()}")
    if result.run_id:
        print(f"logged as artifact encoder/encoder.safetensors of run {result.run_id}")
    return 0


if __name__ == "__main__":
    run_cli(main)
