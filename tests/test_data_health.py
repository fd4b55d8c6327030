"""Bad data over a run (:mod:`maskray.data.health`): lost samples named per shard, the sha256 verification pass
(``make_shards.py --verify`` and ``data.verify_sha256``), and ``data.max_bad_fraction`` stopping a run."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import launch, png_bytes
from mlflow.tracking import MlflowClient

from maskray.config import load_config
from maskray.data import ImageTransform, Sample, Views, build_loader, write_shards
from maskray.data.health import BAD_SHARDS_TAG, DataHealth, raise_if_stopped, stop_note_location
from maskray.errors import DataError

REPO = Path(__file__).resolve().parents[1]
EVAL = Views(image=ImageTransform(8, train=False))


def _shards(directory: Path, n: int = 40, per_shard: int = 10, corrupt: tuple[int, ...] = ()):
    pixels = np.random.default_rng(0).integers(0, 256, (n, 8, 8), dtype=np.uint8)
    samples = [Sample(f"s{i:03d}", image=b"not an image" if i in corrupt else png_bytes(pixels[i]), ext="png",
                      label=i % 2) for i in range(n)]
    return write_shards(samples, directory, samples_per_shard=per_shard, progress=False)


def _alter_member(tar_path: Path, key: str) -> None:
    """Rewrite ``tar_path`` with the image of sample ``key`` changed (a valid PNG of other pixels): the tar and the
    image stay readable, only the sha256 check can tell."""
    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for info, data in members:
            if info.name == f"{key}.png":
                data = png_bytes(np.full((8, 8), 7, dtype=np.uint8))
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _read(shards, **kwargs) -> list[dict]:
    return list(build_loader(shards, EVAL, batch_size=4, num_workers=0, drop_last=False, **kwargs))


def test_lost_samples_are_named_per_shard_and_counted(tmp_path) -> None:
    shards = _shards(tmp_path, corrupt=(3,))
    Path(shards.urls[2]).unlink()  # a shard that vanished after the run started
    health = DataHealth(0.5, rank=0)
    batches = list(health.watch(iter(_read(shards))))
    assert all("bad" not in batch for batch in batches)
    assert health.read == 29 and health.lost == 11 == sum(batch["skipped"] for batch in batches)
    assert not health.check()
    report = health.report()
    assert report["samples_read"] == 29 and report["samples_lost"] == 11
    corrupt = report["shards"]["shard-000000.tar"]
    assert corrupt["keys"] == ["s003"] and corrupt["lost"] == 1
    missing = report["shards"]["shard-000002.tar"]
    assert missing["lost"] == 10 and missing["keys"] == [] and "read 0 of 10 samples" in missing["reasons"][0]


def test_too_much_lost_data_stops_with_one_line_naming_the_shards(tmp_path) -> None:
    shards = _shards(tmp_path / "shards")
    Path(shards.urls[1]).write_bytes(Path(shards.urls[1]).read_bytes()[:1500])  # truncated
    note = stop_note_location(str(tmp_path / "runs"), "run")
    raise_if_stopped(note)  # no note yet: nothing to raise
    health = DataHealth(0.1, rank=0, stop_note=note)
    list(health.watch(iter(_read(shards))))
    assert health.check()
    with pytest.raises(DataError) as caught:
        raise_if_stopped(note)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data.max_bad_fraction: ")
    assert "shard-000001.tar" in message and "> 10.0%" in message and "shard-000000.tar" not in message


def test_verify_reports_samples_whose_bytes_differ_from_the_manifest(tmp_path, capsys) -> None:
    shards = _shards(tmp_path / "shards")
    assert launch("make_shards.py", "--verify", str(tmp_path / "shards")) == 0
    assert "40 samples match the manifest's sha256, 0 do not" in capsys.readouterr().out

    _alter_member(Path(shards.urls[1]), "s012")
    assert launch("make_shards.py", "--verify", str(tmp_path / "shards")) == 2
    captured = capsys.readouterr()
    assert "39 samples match the manifest's sha256, 1 do not" in captured.out
    assert "  bad: sample 's012' of shard-000001.tar: bytes differ from the manifest's sha256" in captured.out
    assert captured.err.strip() == (f"error: --verify: 1 sample(s) of '{tmp_path / 'shards'}' failed verification "
                                    "(listed above)")

    assert len([key for batch in _read(shards) for key in batch["key"]]) == 40  # not checked by default
    batches = _read(shards, verify=True)
    keys = [key for batch in batches for key in batch["key"]]
    assert len(keys) == 39 and "s012" not in keys
    bad = [item for batch in batches for item in batch["bad"]]
    assert [(item.shard, item.key, item.count) for item in bad] == [("shard-000001.tar", "s012", 1)]


@pytest.mark.slow
def test_run_over_the_bad_fraction_stops_naming_the_shards_in_mlflow(ray_session, demo_shards, tmp_path) -> None:
    from maskray.engine.driver import run_pretraining

    train = tmp_path / "train"
    train.mkdir()
    for path in (demo_shards / "train").iterdir():
        train.joinpath(path.name).write_bytes(path.read_bytes())
    train.joinpath("shard-000004.tar").write_bytes(b"")  # an empty (truncated) shard: 100 of 898 samples lost
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(REPO / "configs/demo/mae.yaml", [
        f"data.shards={train}", "eval.train_shards=null", "eval.random_init=false", f"tracking.uri={uri}",
        f"tracking.storage_path={tmp_path / 'runs'}", "train.steps=40", "train.log_every=4",
        "train.checkpoint_every=40",
        "data.batch_size=32", "data.resampled=false", "data.shuffle_buffer=0", "data.max_bad_fraction=0.05",
        "scaling.workers=1", "data.num_workers=0",
    ])
    with pytest.raises(DataError, match=r"^data.max_bad_fraction: 100 of \d+ samples read so far were lost .*"
                                         r"bad shards: shard-000004.tar \(100 lost: read 0 of 100 samples"):
        run_pretraining(config, run_name="bad-data")
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])[0]
    assert run.info.status == "FAILED" and run.data.tags[BAD_SHARDS_TAG] == "shard-000004.tar"
    history = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert history and max(history) < 40  # stopped early, not at the last step
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "data/bad_samples.json", str(tmp_path)))
                        .read_text())
    assert report["shards"]["shard-000004.tar"]["lost"] == 100 and report["samples_lost"] == 100
