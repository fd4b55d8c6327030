"""Pretraining on a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and a second
raylet, 1 CPU each), one training worker per node, two loader workers each, over shards of uneven sizes: both
ranks take the same number of full batches (no hang), no sample goes to both ranks, and every loader worker's
stream holds each sample of its shards exactly once per epoch. The consumed keys come from the key log
(``MASKRAY_KEY_LOG``, :mod:`maskray.data.health`). Its own module: it starts and shuts down its own cluster
(with the session's shared Ray shut down: ``no_shared_ray``)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import png_bytes

from maskray.config import load_config
from maskray.data import Sample, write_shards
from maskray.data.health import KEY_LOG_ENV

REPO = Path(__file__).resolve().parents[1]
BATCH, STEPS, WORKERS = 8, 8, 2  # loader workers per rank; global worker g reads shards g, g + 4, ...

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(no_shared_ray, tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    key_log = tmp_path_factory.mktemp("keys")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    env = {key: os.environ[key] for key in ("PYTHONPATH", "MASKRAY_PLUGINS")}
    env |= {"PYTHONUNBUFFERED": "1", KEY_LOG_ENV: str(key_log)}
    ray.init(address=cluster.address, runtime_env={"env_vars": env})
    yield key_log
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_split_every_epoch_exactly_once_with_equal_batch_counts(two_nodes, tmp_path) -> None:
    from maskray.engine.driver import run_pretraining

    rng = np.random.default_rng(0)
    samples = [Sample(f"k{i:03d}", image=png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), ext="png",
                      label=i % 10) for i in range(80)]
    shards = write_shards(samples, tmp_path / "train", samples_per_shard=16, progress=False)  # 5 shards
    assert len(shards.urls) == 5  # global worker 0 (rank 0) reads two shards, workers 1-3 one each
    config = load_config(REPO / "configs/demo/mae.yaml", [
        f"data.shards={tmp_path / 'train'}", "eval.train_shards=null", "eval.random_init=false",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.storage_path={tmp_path / 'runs'}",
        f"train.steps={STEPS}", "train.log_every=4", f"train.checkpoint_every={STEPS}", "optim.warmup_steps=2",
        f"data.batch_size={BATCH}", "data.resampled=false", "data.shuffle_buffer=0", f"data.num_workers={WORKERS}",
        "scaling.workers=2", "scaling.cpus_per_worker=1",
    ])
    run_pretraining(config, run_name="two-nodes")

    logs = {rank: [json.loads(line) for line in (two_nodes / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}
    # every step's batch, full, on both ranks (rank 0 takes one more at the end for its figures)
    assert len(logs[0]) == STEPS + 1 and len(logs[1]) == STEPS
    assert all(len(entry["keys"]) == BATCH for entries in logs.values() for entry in entries)
    assert logs[0][0]["node"] != logs[1][0]["node"]  # one training worker on each node

    manifest = pq.read_table(tmp_path / "train" / "manifest.parquet").to_pydict()
    shard_of = dict(zip(manifest["key"], manifest["shard"], strict=True))
    names = sorted(set(manifest["shard"]))
    keys_of = {name: [k for k, s in zip(manifest["key"], manifest["shard"], strict=True) if s == name]
               for name in names}
    streams: dict[int, list[str]] = {}
    for rank, entries in logs.items():
        for entry in entries[:STEPS]:
            workers = {names.index(shard_of[key]) % (2 * WORKERS) for key in entry["keys"]}
            assert len(workers) == 1 and workers <= set(range(rank * WORKERS, (rank + 1) * WORKERS))
            streams.setdefault(workers.pop(), []).extend(entry["keys"])
    for worker, stream in streams.items():  # its shards' samples in order, epoch after epoch
        epoch = [key for name in names[worker :: 2 * WORKERS] for key in keys_of[name]]
        assert stream == list(itertools.islice(itertools.cycle(epoch), len(stream)))
        assert len(stream) >= len(epoch)  # at least one whole epoch of each worker was consumed
    consumed = [key for stream in streams.values() for key in stream]
    assert set(consumed) == set(manifest["key"])  # every sample, none on both ranks (checked per worker above)
