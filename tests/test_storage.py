"""Storage locations (:mod:`maskray.storage`) without Ray: local paths unchanged, fsspec and S3 URIs against an
S3-compatible server on 127.0.0.1 (shards and checkpoints read from the bucket), the driver's one-line errors for
an unreachable store or tracking server."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from helpers import launch, upload
from safetensors import safe_open

from maskray import storage
from maskray.checkpoint import checkpoint_step, latest_checkpoint, load_encoder, read_checkpoint_config
from maskray.config import load_config
from maskray.data import ImageTransform, Views, build_loader, resolve_shards
from maskray.data.reader import first_sample
from maskray.engine.driver import storage_location
from maskray.errors import ConfigError, DataError
from maskray.export import export_encoder

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "tests" / "fixtures" / "pre_platform" / "runs" / "pre-platform" / "checkpoint_step2"


def test_local_paths_resolve_to_the_local_filesystem_unchanged(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for location in ("runs", str(tmp_path / "runs"), f"file://{tmp_path / 'runs'}"):
        filesystem, path = storage.resolve(location)
        assert isinstance(filesystem, pafs.LocalFileSystem) and path == str(tmp_path / "runs")
    assert storage.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")
    assert storage.name(str(tmp_path / "a")) == "a" and storage.parent(str(tmp_path / "a")) == str(tmp_path)
    assert not storage.is_uri("runs") and not storage.is_uri("file:///x") and storage.is_uri("s3://b/x")


def test_an_fsspec_uri_becomes_a_pyarrow_filesystem() -> None:
    filesystem, path = storage.resolve("memory://maskray-test/dir")
    assert isinstance(filesystem, pafs.PyFileSystem) and path.endswith("maskray-test/dir")
    storage.make_dirs("memory://maskray-test/dir")
    with filesystem.open_output_stream(f"{path}/x.txt") as out:
        out.write(b"hello")
    assert storage.read_text("memory://maskray-test/dir/x.txt") == "hello"
    assert storage.list_dir("memory://maskray-test/dir") == ["x.txt"]
    assert storage.join("memory://maskray-test/dir", "x.txt") == "memory://maskray-test/dir/x.txt"
    with pytest.raises(ValueError, match="no filesystem"):
        storage.resolve("nosuchscheme://x/y")


def test_credential_env_forwards_only_storage_variables() -> None:
    environ = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json", "HOME": "/root"}
    assert storage.credential_env(environ) == {k: environ[k] for k in ("AWS_ENDPOINT_URL",
                                                                       "GOOGLE_APPLICATION_CREDENTIALS")}


def test_config_keeps_uris_and_makes_local_paths_absolute(tmp_path) -> None:
    config = load_config(None, ["tracking.storage_path=s3://bucket/maskray", "data.shards=gs://b/demo/train"])
    resolved = config.resolved(base=tmp_path)
    assert resolved.tracking.storage_path == "s3://bucket/maskray"  # not a local folder 's3:/bucket/maskray'
    assert resolved.data.shards == "gs://b/demo/train"
    assert load_config(None, ["tracking.storage_path=runs"]).resolved(base=tmp_path).tracking.storage_path == str(
        tmp_path / "runs")


def test_shards_in_a_bucket_read_like_local_ones(s3_bucket, demo_shards, caplog) -> None:
    uri = upload(demo_shards / "test", f"{s3_bucket}/shards/test")
    remote, local = resolve_shards(uri), resolve_shards(str(demo_shards / "test"))
    assert remote.urls[0].startswith(f"{uri}/shard-") and remote.root == uri
    assert (remote.shard_sizes, remote.num_samples, remote.class_names) == (
        local.shard_sizes, local.num_samples, local.class_names)
    assert first_sample(remote).members == first_sample(local).members
    transform = Views(image=ImageTransform(img_size=16, train=False))
    with caplog.at_level(logging.INFO, logger="werkzeug"):  # the S3 server logs every request it serves
        keys = [key for batch in build_loader(remote, transform, batch_size=64, num_workers=0, drop_last=False)
                for key in batch["key"]]
    # read ahead in large requests, not one ranged GET per tar header and member (hundreds per shard)
    reads = [r for r in caplog.records if "GET /" in r.getMessage() and "/shard-" in r.getMessage()]
    assert 0 < len(reads) <= 2 * len(remote.urls), len(reads)
    expected = [key for batch in build_loader(local, transform, batch_size=64, num_workers=0, drop_last=False)
                for key in batch["key"]]
    assert keys == expected and len(keys) == local.num_samples
    with pytest.raises(DataError, match="does not exist"):
        resolve_shards(f"{s3_bucket}/shards/none")


def test_a_checkpoint_in_a_bucket_is_found_read_and_exported(s3_bucket, tmp_path) -> None:
    run_dir = f"{s3_bucket}/runs/pre-platform"
    upload(CHECKPOINT, f"{run_dir}/checkpoint_step2")
    found = latest_checkpoint(run_dir)
    assert found == f"{run_dir}/checkpoint_step2" and checkpoint_step(found) == 2
    assert read_checkpoint_config(found) == read_checkpoint_config(CHECKPOINT)
    remote, _ = load_encoder(found)
    local, _ = load_encoder(CHECKPOINT)
    assert all((a == b).all() for a, b in zip(remote.state_dict().values(), local.state_dict().values(), strict=True))
    out = tmp_path / "encoder.safetensors"
    assert launch("export.py", "--checkpoint", found, "--out", str(out)) == 0
    with safe_open(str(out), "pt") as exported:
        assert exported.metadata()["checkpoint"] == found and exported.metadata()["step"] == "2"
    assert export_encoder(tmp_path / "again.safetensors", checkpoint=found).checkpoint == found
    with pytest.raises(ConfigError, match="not a maskray checkpoint"):
        read_checkpoint_config(f"{s3_bucket}/runs/none")


def test_unusable_storage_path_is_a_config_error(s3_bucket) -> None:
    storage_location(f"{s3_bucket}/runs/new")  # an existing bucket: fine
    with pytest.raises(ConfigError, match="tracking.storage_path: cannot use 's3://no-such-bucket/x'"):
        storage_location("s3://no-such-bucket/x")
