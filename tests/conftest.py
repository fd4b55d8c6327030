"""Shared fixtures: one local Ray (2 CPUs) for the session, with a check for leftovers after each test on it;
demo shards and the demo config built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import free_port, local_s3, start_mlflow_server, stop_process

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Ray Train V2, read by its controller (propagated from the driver's environment): notice a finished worker group
# within a quarter second rather than 2 s, and no node-drain watcher actor per run (no test drains a node)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Read when @triton.jit decorates a kernel: set before anything imports Triton. Kernels only run on CPU
# tensors when a test also sets MASKRAY_TRITON_INTERPRET=1 (tests/test_kernels.py). MASKRAY_TRITON_DEVICE=cuda
# (the GPU suite, benchmarks/gpu/run.sh) leaves it unset: the kernel tests then run compiled kernels on the GPU.
if os.environ.get("MASKRAY_TRITON_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = Path(__file__).resolve().parents[1]
# Test-only objectives (tests/plugins/maskray_testing), importable here and in Ray workers.
PLUGINS = REPO / "tests" / "plugins"
sys.path.insert(0, str(PLUGINS))
os.environ["MASKRAY_PLUGINS"] = "objectives,maskray_testing"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))


@pytest.fixture
def one_thread():
    """Small CPU ops are much faster single-threaded on a shared 2-core machine (and results reproducible)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SharedRay:
    """The session's one local Ray (2 CPUs), started when a test first needs it and shut down at the end of the
    session, or earlier for a test that needs Ray to itself (:func:`no_shared_ray`)."""

    def __init__(self) -> None:
        self.running = False
        self.env: dict[str, str] = {}

    def start(self):
        """Start it, or restart it where its workers lack a variable the caller's process has now: the storage
        credentials and endpoint (``AWS_*``, ... as the launcher passes them) that a fixture such as
        :func:`s3_bucket` set after the instance started."""
        import ray

        from maskray.storage import credential_env

        env = {key: os.environ[key] for key in ("PYTHONPATH", "MASKRAY_PLUGINS")} | {"PYTHONUNBUFFERED": "1"}
        env |= credential_env()
        if self.running and ray.is_initialized() and env.items() <= self.env.items():
            return ray
        if ray.is_initialized():  # started with other variables, or by a test in-process without this fixture
            ray.shutdown()
        # "local": a new instance even where another one on this machine is findable (ray_current_cluster)
        ray.init(address="local", num_cpus=2, runtime_env={"env_vars": env})
        self.running, self.env = True, env
        return ray

    def stop(self) -> None:
        import ray

        if self.running:
            ray.shutdown()
            self.running, self.env = False, {}


SHARED_RAY = SharedRay()


def _on_ray(item) -> bool:
    """A test that runs Ray: the shared instance or one of its own."""
    return bool({"ray_session", "no_shared_ray"} & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """The Ray tests first, those that need Ray to themselves (their own ``ray.cluster_utils.Cluster``, a launcher
    subprocess with its own local Ray, or no Ray at all) before the shared instance starts, then the slow ones (a
    stable sort: the rest keep their order). Under ``make test`` (``pytest -n 2 --dist loadgroup``) the Ray tests are
    one group, run in order by one process, so that one Ray instance at most runs on the machine (Ray Train's
    per-run helpers look their cluster up by scanning the machine's processes); the other process runs the slow
    tests without Ray (the GPU suite's smoke run) beside them, then the rest at a lower priority
    (:func:`beside_the_ray_tests`), on what Ray's start-ups and waits leave idle."""
    items.sort(key=lambda item: (not _on_ray(item), "no_shared_ray" not in getattr(item, "fixturenames", ()),
                                 not item.get_closest_marker("slow")))
    for item in items:
        if _on_ray(item):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(autouse=True)
def beside_the_ray_tests(request) -> None:
    """In a pytest-xdist worker, a short test outside the Ray group lowers its process's priority to the lowest, 19
    (once; it stays low): the Ray group sets the pace of the run. Ray starts its worker processes at niceness 15
    (``RAY_worker_niceness``), so anything less would put these tests ahead of the Ray Train workers. The slow tests
    without Ray run before, at normal priority: their steps have time limits."""
    if os.environ.get("PYTEST_XDIST_WORKER") and not _on_ray(request.node) and not request.node.get_closest_marker(
            "slow"):
        os.nice(19 - os.getpriority(os.PRIO_PROCESS, 0))


def pytest_sessionfinish(session, exitstatus) -> None:
    SHARED_RAY.stop()


# A hang once kept this instance per module: in a long-lived instance a TorchTrainer run stopped after "Requesting
# resources" (the driver's core worker never saw its controller actor ALIVE, so ``controller.run`` stayed queued).
# Ray Train's fit() then left its controller alive until the next fit() (its SIGINT handler held the handle), so the
# previous controller was released while the next one was being created. Since the driver restores its SIGINT
# handler after each run (maskray.engine.driver_stop), controllers end with their run and the hang has not been
# seen again (every Ray test on one instance, repeatedly); that this was its cause is likely, not proven.
@pytest.fixture(scope="module")
def ray_session():
    """The session's local Ray with 2 CPUs (:class:`SharedRay`), started by the first module that asks for it
    (restarted for a module whose storage variables its workers lack: request ``s3_bucket`` before it).
    :func:`ray_leftovers` checks after every test on it that nothing is left holding resources (placement groups,
    CPUs, actors), and removes what is."""
    return SHARED_RAY.start()


@pytest.fixture(scope="module")
def no_shared_ray():
    """Shut the shared Ray down (if it runs) for a module that starts its own (a ``ray.cluster_utils.Cluster``, a
    launcher subprocess with its own local Ray) or needs none; such tests are ordered before all others."""
    SHARED_RAY.stop()


# Detached actors that Ray itself keeps for the life of the instance: Ray Data's / Train V2's resource-request
# coordinator (one per cluster, it forwards requests to the autoscaler; expired requests are purged).
KEPT_ACTORS = {"AutoscalingCoordinator"}


def _leftovers(ray) -> list[str]:
    """What a finished test left on the shared Ray: placement groups not removed, CPUs in use, live actors."""
    from ray.util import placement_group_table

    found = [f"placement group {pg_id} ({pg.get('name') or 'unnamed'}): {pg['state']}"
             for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"]
    total, available = ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0)
    if available < total:
        found.append(f"{total - available:g} of {total:g} CPUs in use")
    try:
        from ray.util.state import list_actors

        found += [f"actor {actor.class_name} {actor.name or ''} ({actor.actor_id}) alive"
                  for actor in list_actors(filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
                  if actor.name not in KEPT_ACTORS]
    except Exception as error:  # the state API needs the dashboard
        found.append(f"(actors not listed: {type(error).__name__})")
    return found if any(not item.startswith("(") for item in found) else []


@pytest.fixture(autouse=True)
def ray_leftovers(request):
    """After each test that used the shared Ray: warn (a pytest warning, listed in the summary) about placement
    groups, CPUs in use or live actors it left behind once they had 5 s to go (Ray releases them asynchronously),
    and remove the placement groups so later tests start clean. A warning, not a failure: what Ray releases
    asynchronously can take longer on a loaded machine."""
    yield
    if "ray_session" not in request.fixturenames or not SHARED_RAY.running:
        return
    import time
    import warnings

    import ray

    deadline = time.monotonic() + 5
    while (found := _leftovers(ray)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not found:
        return
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    for pg_id, pg in placement_group_table().items():
        if pg["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    warnings.warn("left on the shared Ray after the test (placement groups removed): " + "; ".join(found),
                  stacklevel=1)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """``<tmp>/demo/{train,test}`` written from scikit-learn's digits through the real CLI."""
    import subprocess

    out = tmp_path_factory.mktemp("shards") / "demo"
    subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), "demo", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def knn_shards(demo_shards) -> Path:
    """``<tmp>/demo/knn/{train,test}``: the first two shards of each demo split (about 200 images each, their
    manifest rows only), the k-NN sets of the end-to-end runs. The whole splits (900 images each) would make the
    encoder's forward passes a third of a short run's CPU time; the k-NN's accuracy is tested in
    test_eval_compare_export.py and measured in benchmarks/."""
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = demo_shards / "knn"
    for split in ("train", "test"):
        table = pq.read_table(demo_shards / split / "manifest.parquet")
        kept = sorted(set(table["shard"].to_pylist()))[:2]
        (out / split).mkdir(parents=True)
        pq.write_table(table.filter(pc.is_in(table["shard"], value_set=pa.array(kept))),
                       out / split / "manifest.parquet")
        for name in kept:
            shutil.copy(demo_shards / split / name, out / split / name)
    return out


@pytest.fixture(scope="session")
def demo_config(demo_shards, knn_shards):
    """``demo_config(root, *overrides, config="mae.yaml")``: ``configs/demo/<config>`` on the demo shards (training;
    the k-NN on :func:`knn_shards`), tracked in ``root`` (``root/mlflow.db``, checkpoints under ``root/runs``), then
    ``overrides`` (later ones win: ``eval.train_shards=null`` turns the k-NN off). The tiny demo run of the end to
    end tests."""
    from maskray.config import load_config

    def build(root: Path, *overrides: str, config: str = "mae.yaml"):
        return load_config(REPO / "configs" / "demo" / config, [
            f"data.shards={demo_shards / 'train'}", f"eval.train_shards={knn_shards / 'train'}",
            f"eval.test_shards={knn_shards / 'test'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            f"tracking.storage_path={root / 'runs'}", *overrides,
        ])

    return build


@pytest.fixture(scope="session")
def demo_clip_shards(tmp_path_factory) -> Path:
    """``<tmp>/demo_clips/{clips,train,test}``: the moving-digit clips and their labelled frames, through the CLI."""
    import subprocess

    out = tmp_path_factory.mktemp("shards") / "demo_clips"
    subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), "demo-clips", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def process_group():
    """A world-size-1 gloo process group on 127.0.0.1 for DeepSpeed engines inside the test process; yields the
    deepspeed module. Session-wide and destroyed once at the end: DeepSpeed keeps its groups, so a second init
    after a destroy fails."""
    import deepspeed
    import torch.distributed as dist

    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        deepspeed.init_distributed("gloo")
        yield deepspeed
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def s3_bucket():
    """``s3://maskray-test`` on an S3-compatible server (moto's server mode) on 127.0.0.1, started for the module.

    The standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) point at it for the module, so
    pyarrow, boto3 and Ray workers reach it (request it before ``ray_session``, which then restarts the shared Ray
    with them)."""
    with local_s3("maskray-test") as uri:
        yield uri


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` process on 127.0.0.1 (free port; SQLite backend and served artifacts under a
    temporary directory), stopped after the module. Yields ``(tracking_uri, artifacts_dir)``."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = start_mlflow_server(root, port)
    yield f"http://127.0.0.1:{port}", root / "artifacts"
    stop_process(process)
