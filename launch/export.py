"""Export a pretrained encoder as a timm-loadable safetensors file or as ONNX (logged to its MLflow run as well).

    python launch/export.py --run-id ID | --checkpoint DIR --out encoder.safetensors [--tracking-uri URI]
    python launch/export.py --run-id ID | --checkpoint DIR --format onnx --out encoder.onnx

safetensors: prints the ``timm.create_model`` call that loads the file. onnx (optional extra: pip install -e
'.[onnx]'): images (B, C, H, W) -> tokens (B, 1+L, D) after the final norm, dynamic batch axis; prints the max abs
difference between onnxruntime and torch on a random batch.
"""

from __future__ import annotations

import argparse

from maskray.cli import run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", help="MLflow run of a pretraining run (its latest checkpoint is exported)")
    parser.add_argument("--checkpoint", help="checkpoint directory (encoder.safetensors + model.json)")
    parser.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                        help="output format (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output file (.safetensors or .onnx)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    args = parser.parse_args()

    from maskray.export import export_encoder, export_onnx

    if args.format == "onnx":
        result = export_onnx(args.out, args.run_id, args.checkpoint, args.tracking_uri)
        print(f"wrote {result.path} from {result.checkpoint}")
        print(f"onnxruntime vs torch on a random {result.check_shape} batch: max abs difference "
              f"{result.max_abs_diff:.3g}")
        artifact = "encoder/encoder.onnx"
    else:
        result = export_encoder(args.out, args.run_id, args.checkpoint, args.tracking_uri)
        print(f"wrote {result.path} from {result.checkpoint}")
        print(f"load it with: {result.create_model_call()}")
        artifact = "encoder/encoder.safetensors"
    if result.run_id:
        print(f"logged as artifact {artifact} of run {result.run_id}")
    return 0


if __name__ == "__main__":
    run_cli(main)
