"""Recovery from a lost training worker on the demo: seconds from the kill to the first step after the restart.

    python benchmarks/recovery.py [--steps 100] [--every 20] [--out /tmp/bench-recovery]

One run of the MAE demo config (2 workers, batch 64 each, ZeRO-2; k-NN off) through ``launch/pretrain.py``, with
the test objective ``fault_mae`` (``tests/plugins``: MAE whose worker signals itself at a given step). Rank 1
gets SIGTERM during step ``0.3 * steps`` (it checkpoints at the next step; Ray Train restarts the group from
there) and SIGKILL during step ``0.7 * steps`` (the group restarts from the latest periodic checkpoint, every
``--every`` steps). For each fault: seconds from the signal to the first forward of rank 0's restarted process,
and the steps trained again (those it had completed minus the step it resumed at). The last line printed is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-recovery")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    markers = args.out / "markers"
    markers.mkdir(parents=True)
    data = args.out / "demo"
    from maskray.data.cli import make_shards

    make_shards(["demo", str(data)])

    faults = [(int(0.3 * args.steps), "SIGTERM"), (int(0.7 * args.steps), "SIGKILL")]
    fault_list = "[" + ", ".join(f"{{step: {step}, rank: 1, signal: {name}}}" for step, name in faults) + "]"
    overrides = [f"data.shards={data / 'train'}", "eval.train_shards=null",
                 f"tracking.uri=sqlite:///{args.out / 'mlflow.db'}", f"tracking.storage_path={args.out / 'runs'}",
                 f"train.steps={args.steps}", "train.log_every=10", f"train.checkpoint_every={args.every}",
                 "objective.name=fault_mae", f"objective.faults={fault_list}", f"objective.marker_dir={markers}"]
    plugins = REPO / "tests" / "plugins"
    env = {**os.environ, "MASKRAY_PLUGINS": "objectives,maskray_testing",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(plugins), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"),
                    "--config", str(REPO / "configs/demo/mae.yaml"), "--run-name", "recovery",
                    *[item for o in overrides for item in ("--set", o)]],
                   cwd=args.out, env=env, check=True)
    wall = time.perf_counter() - started
    row: dict = {"steps": args.steps, "checkpoint_every": args.every, "workers": 2, "run_s": round(wall, 1)}
    for index, (step, name) in enumerate(faults):
        killed = float((markers / f"fault{index}").read_text())
        resumed = json.loads((markers / f"resumed{index}_rank0.json").read_text())
        completed = step + (name == "SIGTERM")  # a SIGTERM lets the step in flight finish
        row[name] = {"recovery_s": round(resumed["time"] - killed, 1), "died_in_step": step + 1,
                     "resumed_at_step": resumed["step"], "steps_trained_again": completed - resumed["step"]}
        print(f"{name}: {row[name]['recovery_s']:.1f} s from the signal to the first step after the restart, "
              f"{row[name]['steps_trained_again']} steps trained again")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
