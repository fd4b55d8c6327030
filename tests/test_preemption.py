"""Preemption through the real launcher (``launch/pretrain.py`` in its own process, with its own local Ray):
SIGTERM to the driver checkpoints and exits with one line (code 143), a re-submission resumes; after a hard
kill (``kill -9``) of the driver and a re-submission, no step is in MLflow's history twice and none is missing."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from maskray.checkpoint import checkpoint_step, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

STEPS = 20


class Driver:
    """``launch/pretrain.py`` in its own session; its output lines are collected while it runs."""

    def __init__(self, demo_shards: Path, tmp_path: Path) -> None:
        overrides = [f"data.shards={demo_shards / 'train'}", "eval.train_shards=null",
                     f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.storage_path={tmp_path / 'runs'}",
                     f"train.steps={STEPS}", "train.log_every=1", "train.checkpoint_every=4", "optim.warmup_steps=2",
                     "data.batch_size=16", "data.num_workers=0"]  # loader processes under faults: test_faults_ray
        command = [sys.executable, str(REPO / "launch" / "pretrain.py"),
                   "--config", str(REPO / "configs/demo/mae.yaml"), "--run-name", "preempted",
                   *[item for o in overrides for item in ("--set", o)]]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        cwd=tmp_path, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, into in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=self._read, args=(stream, into), daemon=True).start()

    def _read(self, stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if text in self.lines.get(timeout=1.0):
                    return
            except queue.Empty:
                assert self.process.poll() is None, "driver exited early:\n" + "\n".join(self.stderr[-20:])
        raise AssertionError(f"no {text!r} in the driver's output within {timeout} s")

    def finish(self, timeout: float = 300.0) -> int:
        code = self.process.wait(timeout=timeout)
        time.sleep(0.5)  # the readers drain the pipes
        return code

    def kill_session(self) -> None:
        """What is left of the driver's process group (its local Ray) goes too, as with a lost machine."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_checkpoints_and_exits_cleanly_and_a_killed_driver_never_duplicates_steps(
    no_shared_ray, demo_shards, tmp_path
) -> None:
    runs = tmp_path / "runs" / "preempted"
    first = Driver(demo_shards, tmp_path)
    first.wait_for("[rank 0] step 2/")
    first.process.send_signal(signal.SIGTERM)
    code = first.finish()
    errors = [line for line in first.stderr if line.strip()]
    assert code == 143, "\n".join(errors[-30:])
    assert errors[-1].startswith("stopped: SIGTERM to the driver: run 'preempted' checkpointed; re-submit it with "
                                 "--run-name preempted to resume")
    assert not any("Fatal Python error" in line or "Traceback" in line or "core dumped" in line for line in errors)
    stopped_at = checkpoint_step(latest_checkpoint(runs))
    assert 2 < stopped_at < STEPS
    first.kill_session()

    second = Driver(demo_shards, tmp_path)  # resumes, then is killed 2 steps past its next checkpoint
    killed_after = (stopped_at // 4 + 1) * 4
    second.wait_for(f"[rank 0] step {killed_after + 2}/")
    second.process.kill()
    second.finish()
    second.kill_session()
    assert checkpoint_step(latest_checkpoint(runs)) >= killed_after

    third = Driver(demo_shards, tmp_path)
    assert third.finish() == 0, "\n".join(third.stderr[-30:])
    assert third.stdout[-1].startswith("mlflow_run_id=")
    assert any(line.startswith("run preempted (resumed)") for line in third.stdout)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = third.stdout[-1].split("=", 1)[1]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, STEPS + 1))
    runs_found = client.search_runs([client.get_experiment_by_name("maskray-demo").experiment_id])
    assert len(runs_found) == 1 and runs_found[0].info.status == "FINISHED"
