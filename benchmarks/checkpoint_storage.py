"""Checkpointing to an S3-compatible server versus local disk, on the demo model.

    python benchmarks/checkpoint_storage.py [--steps 40] [--every 10] [--repeats 5] [--out /tmp/bench-ckpt]

Starts moto's S3 server on 127.0.0.1 (the ``s3`` extra; the AWS variables point at it, and the driver forwards
them to the Ray workers), then:

1. two demo runs through ``launch/pretrain.py`` (2 workers, ``--steps`` steps, a checkpoint every ``--every``), one with
   ``tracking.storage_path`` on local disk and one in the bucket: wall time of ``run_pretraining`` and of the
   training loop (first to last logged ``loss``, one log per checkpoint interval);
2. a timed save of the same checkpoint (the local run's last one): Ray Train's own upload
   (``_upload_to_fs_path``, what ``ray.train.report`` runs per rank) to a local directory and to the bucket,
   ``--repeats`` times each, median.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the local S3 server of the tests

from helpers import local_s3  # noqa: E402


def _run(storage_path: str, data: Path, args: argparse.Namespace, name: str) -> dict:
    """One demo run through ``launch/pretrain.py`` (its own process and local Ray); wall time and loop time."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{args.out / 'mlflow.db'}"
    overrides = [f"data.shards={data / 'train'}", "eval.train_shards=null", f"tracking.uri={uri}",
                 f"tracking.storage_path={storage_path}", f"train.steps={args.steps}", f"train.log_every={args.every}",
                 f"train.checkpoint_every={args.every}"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--config",
                           str(REPO / "configs/demo/mae.yaml"), "--run-name", name,
                           *[item for o in overrides for item in ("--set", o)]],
                          cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - started
    run_id = [line for line in done.stdout.splitlines() if line.startswith("mlflow_run_id=")][-1].split("=", 1)[1]
    stamps = sorted(m.timestamp for m in MlflowClient(uri).get_metric_history(run_id.strip(), "loss"))
    return {"storage_path": storage_path, "run_s": round(wall, 1), "loop_s": round((stamps[-1] - stamps[0]) / 1e3, 1),
            "checkpoints": args.steps // args.every}


def _timed_save(checkpoint: Path, destination: str, repeats: int) -> float:
    from ray.train.v2._internal.execution.storage import _upload_to_fs_path

    from maskray import storage

    filesystem, path = storage.resolve(destination)
    seconds = []
    for i in range(repeats):
        started = time.perf_counter()
        _upload_to_fs_path(str(checkpoint), filesystem, f"{path}/save{i}")
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-ckpt")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    data = args.out / "demo"
    from maskray.data.cli import make_shards

    make_shards(["demo", str(data)])

    from maskray.checkpoint import latest_checkpoint

    with local_s3("bench") as bucket:
        runs = {"local": _run(str(args.out / "runs"), data, args, "local"),
                "s3": _run(f"{bucket}/runs", data, args, "s3")}
        checkpoint = Path(latest_checkpoint(args.out / "runs" / "local"))
        size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        save = {"local": _timed_save(checkpoint, str(args.out / "saves"), args.repeats),
                "s3": _timed_save(checkpoint, f"{bucket}/saves", args.repeats)}
    row = {"runs": runs, "checkpoint_mb": round(size / 2**20, 1), "checkpoint_files": len(list(checkpoint.rglob("*"))),
           "save_s": {key: round(value, 3) for key, value in save.items()}}
    for key, run in runs.items():
        print(f"{key:5s} run {run['run_s']:6.1f} s, loop {run['loop_s']:6.1f} s ({run['checkpoints']} checkpoints)")
    print(f"timed save of a {row['checkpoint_mb']} MiB checkpoint: local {save['local']:.3f} s, s3 {save['s3']:.3f} s")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
