"""Data layer: shard writing, manifest, sources, transforms, the streaming reader and make_shards CLI."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import pickle
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import npy_bytes, png_bytes
from PIL import Image

from maskray.data import (
    MANIFEST_NAME,
    ImageTransform,
    LoaderOptions,
    Sample,
    Views,
    build_loader,
    clip_folder,
    demo,
    image_folder,
    infinite_batches,
    parquet_file,
    read_manifest,
    resolve_shards,
    steps_per_epoch,
    write_shards,
)
from maskray.data.cli import main as make_shards_main
from maskray.data.manifest import write_manifest
from maskray.data.reader import read_tars
from maskray.errors import DataError

REPO = Path(__file__).resolve().parents[1]
EVAL = Views(image=ImageTransform(8, train=False))


def _png(seed: int, size: int = 8, mode: str = "L", fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def _samples(n: int, labelled: bool = True, corrupt: tuple[int, ...] = ()) -> list[Sample]:
    return [
        Sample(f"s{i:03d}", image=b"not an image" if i in corrupt else _png(i), ext="png",
               label=i % 3 if labelled else None)
        for i in range(n)
    ]


def _write(directory: Path, n: int, per_shard: int, **kwargs):
    labelled = kwargs.pop("labelled", True)
    corrupt = kwargs.pop("corrupt", ())
    return write_shards(
        _samples(n, labelled, corrupt), directory, samples_per_shard=per_shard, progress=False, **kwargs
    )


def _read(shards, *, world_size=1, num_workers=0, batch_size=4, drop_last=False, **kwargs):
    """All batches of all simulated ranks, in rank order."""
    return [
        batch
        for rank in range(world_size)
        for batch in build_loader(
            shards,
            EVAL,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            drop_last=drop_last,
            **kwargs,
        )
    ]


def _one_line_error(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


# --- writer and manifest ------------------------------------------------------------------------------


def test_manifest_columns_match_tar_contents(tmp_path):
    shards = _write(tmp_path, 53, 10, class_names=("a", "b", "c"), source="unit test")
    assert [os.path.basename(u) for u in shards.urls] == [f"shard-{i:06d}.tar" for i in range(6)]
    assert shards.shard_sizes == (10, 10, 10, 10, 10, 3) and shards.num_samples == 53
    assert shards.num_classes == 3 and shards.class_names == ("a", "b", "c") and shards.labelled

    table = read_manifest(tmp_path)
    assert table.column_names == ["shard", "key", "label", "nbytes", "sha256", "frames"]
    assert all(table.schema.field(name).type == pa.int64() for name in ("label", "nbytes", "frames"))
    assert set(table["frames"].to_pylist()) == {1}
    metadata = table.schema.metadata
    assert metadata[b"num_classes"] == b"3" and json.loads(metadata[b"class_names"]) == ["a", "b", "c"]
    assert metadata[b"source"] == b"unit test"

    members = {}
    for url in shards.urls:
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                members[(os.path.basename(url), member.name)] = tar.extractfile(member).read()
    for row in table.to_pylist():
        image = members[(row["shard"], row["key"] + ".png")]
        assert row["nbytes"] == len(image) and row["sha256"] == hashlib.sha256(image).hexdigest()
        assert members[(row["shard"], row["key"] + ".cls")] == str(row["label"]).encode()
    assert len(members) == 2 * 53


def test_tar_members_carry_no_pax_header(tmp_path):
    """Integer member mtimes: a float one makes tarfile write a PAX header per member, which the reader parses."""
    shards = _write(tmp_path, 4, 4)
    with tarfile.open(shards.urls[0]) as tar:
        members = tar.getmembers()
    assert members and all(m.pax_headers == {} and m.mtime == 0 for m in members)


def test_unlabelled_samples_have_no_cls_and_label_minus_one(tmp_path):
    shards = _write(tmp_path, 12, 5, labelled=False)
    assert shards.num_classes == 0 and not shards.labelled
    assert set(read_manifest(tmp_path)["label"].to_pylist()) == {-1}
    with tarfile.open(shards.urls[0]) as tar:
        assert all(name.endswith(".png") for name in tar.getnames())
    assert all((batch["label"] == -1).all() for batch in _read(shards))


def test_overwrite_refusal_and_overwrite(tmp_path):
    _write(tmp_path, 25, 10)
    with pytest.raises(DataError) as excinfo:
        _write(tmp_path, 5, 10)
    _one_line_error(excinfo, str(tmp_path), "--overwrite")
    shards = _write(tmp_path, 5, 10, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "shard-000000.tar"]
    assert shards.num_samples == 5


def test_duplicate_and_invalid_keys_are_rejected(tmp_path):
    with pytest.raises(DataError) as excinfo:
        write_shards([Sample("k", {"png": _png(0)}), Sample("k", {"png": _png(1)})], tmp_path / "a", progress=False)
    _one_line_error(excinfo, "duplicate", "'k'")
    with pytest.raises(DataError, match="no dots"):
        write_shards([Sample("a.b", {"png": _png(0)})], tmp_path / "b", progress=False)


# --- resolve_shards -----------------------------------------------------------------------------------


def test_resolve_shards_errors(tmp_path):
    with pytest.raises(DataError) as excinfo:
        resolve_shards(str(tmp_path / "nope"))
    _one_line_error(excinfo, "data.shards:", "does not exist", str(tmp_path / "nope"))

    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError) as excinfo:
        resolve_shards(str(tmp_path / "bare"), key="eval.train_shards")
    _one_line_error(excinfo, "eval.train_shards:", MANIFEST_NAME, "make_shards.py", str(tmp_path / "bare"))

    (tmp_path / "empty").mkdir()
    write_manifest(
        tmp_path / "empty",
        {"shard": [], "key": [], "label": [], "nbytes": [], "sha256": [], "frames": []},
        num_classes=0,
        class_names=(),
        source="",
    )
    with pytest.raises(DataError) as excinfo:
        resolve_shards(str(tmp_path / "empty"))
    _one_line_error(excinfo, "is empty (0 samples)", str(tmp_path / "empty"))

    _write(tmp_path / "set", 25, 10)
    (tmp_path / "set" / "shard-000001.tar").unlink()
    with pytest.raises(DataError) as excinfo:
        resolve_shards(str(tmp_path / "set"))
    _one_line_error(excinfo, "'shard-000001.tar'", "is missing", MANIFEST_NAME)


# --- reader -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "shuffle_buffer"),
    [(53, 0), (53, 16), (30, 0)],  # 6 uneven shards (shuffled or not); 3 shards < 4 global workers
)
def test_every_sample_read_once_across_ranks_and_workers(tmp_path, n, shuffle_buffer):
    shards = _write(tmp_path, n, 10)
    batches = _read(shards, world_size=2, num_workers=2, shuffle_buffer=shuffle_buffer, seed=3, epoch=1)
    keys = Counter(key for batch in batches for key in batch["key"])
    assert keys == Counter(f"s{i:03d}" for i in range(n))
    for batch in batches:
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 8, 8)
        assert batch["label"].dtype == torch.int64 and batch["skipped"] == 0
        assert batch["label"].tolist() == [int(key[1:]) % 3 for key in batch["key"]]


def test_drop_last_in_process(tmp_path):
    shards = _write(tmp_path, 53, 10)
    assert [len(b["key"]) for b in _read(shards, batch_size=8, drop_last=True)] == [8] * 6
    assert [len(b["key"]) for b in _read(shards, batch_size=8, drop_last=False)] == [8] * 6 + [5]


def test_truncated_tar_and_corrupt_image_are_skipped_and_counted(tmp_path, caplog):
    shards = _write(tmp_path, 53, 10, corrupt=(7,))
    truncated = Path(shards.urls[3])
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    in_shard3 = {f"s{i:03d}" for i in range(30, 40)}

    batches = _read(shards)
    keys = [key for batch in batches for key in batch["key"]]
    assert len(keys) == len(set(keys))
    assert set(keys) | in_shard3 == {f"s{i:03d}" for i in range(53) if i != 7}
    lost_in_shard3 = 10 - len(in_shard3 & set(keys))
    assert 0 < lost_in_shard3 < 10
    assert sum(batch["skipped"] for batch in batches) == 1 + lost_in_shard3 == 53 - len(keys)
    assert "'s007'" in caplog.text and "shard-000000.tar" in caplog.text and "shard-000003.tar" in caplog.text

    batches = _read(shards, world_size=2, num_workers=2)
    assert sum(batch["skipped"] for batch in batches) == 53 - sum(len(batch["key"]) for batch in batches)
    assert sum(len(batch["key"]) for batch in batches) == len(keys)


def test_read_ahead_yields_the_same_stream_of_samples_and_losses(tmp_path, caplog):
    shards = _write(tmp_path, 53, 10, corrupt=(7,))
    truncated = Path(shards.urls[3])
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    Path(shards.urls[4]).write_bytes(b"")
    pairs = list(zip(shards.urls, shards.shard_sizes, strict=True))
    one = list(read_tars(pairs))
    assert sum(1 for item in one if isinstance(item, dict)) < 53 and any(not isinstance(item, dict) for item in one)
    for read_ahead in (3, 10, 64):
        assert list(read_tars(pairs, read_ahead=read_ahead)) == one


def test_resampled_is_deterministic_with_full_batches(tmp_path):
    shards = _write(tmp_path, 53, 10)

    def keys(seed):
        batches = _read(shards, world_size=2, num_workers=2, batch_size=8, resampled=True, seed=seed)
        assert [len(b["key"]) for b in batches] == [8] * (2 * steps_per_epoch(shards, 8, 2))
        return [b["key"] for b in batches]

    assert steps_per_epoch(shards, 8, 2) == 3 and steps_per_epoch(shards, 64, 2) == 1
    assert keys(5) == keys(5)
    assert keys(5) != keys(6)


def test_infinite_batches_crosses_epochs_and_rejects_starved_ranks(tmp_path):
    shards = _write(tmp_path, 53, 10)
    stream = infinite_batches(shards, EVAL, LoaderOptions(16, num_workers=0, shuffle_buffer=8))
    epochs = [[key for batch in itertools.islice(stream, 3) for key in batch["key"]] for _ in range(2)]
    assert len(epochs[0]) == len(epochs[1]) == 48 and epochs[0] != epochs[1]
    big = next(infinite_batches(shards, EVAL, LoaderOptions(64, num_workers=0)))  # spans two epochs
    assert len(big["key"]) == 64 and len(set(big["key"])) == 53
    with pytest.raises(DataError, match="rank 6 gets no shard"):  # 6 shards, 7 ranks
        next(infinite_batches(shards, EVAL, LoaderOptions(8, num_workers=0), rank=6, world_size=7))


def test_loader_pipeline_and_transforms_pickle(tmp_path):
    shards = _write(tmp_path, 5, 10)
    transform = Views(image=ImageTransform(8, train=True))
    loader = build_loader(shards, transform, batch_size=2, num_workers=2, shuffle_buffer=4)
    dataset = pickle.loads(pickle.dumps(loader.pipeline[0].dataset))  # what forkserver workers receive
    assert sum(len(batch["key"]) for batch in dataset) == 4  # drop_last


def test_image_transform_shapes():
    image = Image.open(io.BytesIO(_png(0, size=12, mode="RGB")))
    assert ImageTransform(16, train=True)(image).shape == (3, 16, 16)
    assert ImageTransform(16, train=False, in_chans=1)(image).shape == (1, 16, 16)
    wide = Image.new("RGB", (20, 10))
    assert ImageTransform(8, train=False)(wide).shape == (3, 8, 8)


# --- sources and CLI ----------------------------------------------------------------------------------


def test_image_folder_with_class_subfolders(tmp_path):
    root = tmp_path / "images"
    for rel, data in {
        "cat/a.png": _png(0),
        "cat/b.v2.jpg": _png(1, mode="RGB", fmt="JPEG"),
        "dog/sub/c.bmp": _png(2, fmt="BMP"),
        "top.png": _png(3),
        ".hidden/d.png": _png(4),
        "cat/notes.txt": b"ignored",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    source = image_folder(root)
    assert source.class_names == ("cat", "dog") and source.total == 4
    samples = {s.key: s for s in source.samples()}
    assert {k: (s.label, list(s.members)) for k, s in samples.items()} == {
        "cat_a": (0, ["png"]),
        "cat_b_v2": (0, ["jpg"]),
        "dog_sub_c": (1, ["png"]),  # BMP re-encoded
        "top": (None, ["png"]),
    }
    assert samples["cat_b_v2"].members["jpg"] == (root / "cat/b.v2.jpg").read_bytes()
    shards = write_shards(source.samples(), tmp_path / "out", class_names=source.class_names, progress=False)
    assert shards.num_classes == 2 and read_manifest(tmp_path / "out")["label"].to_pylist() == [0, 0, 1, -1]
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "missing")


def test_parquet_source_huggingface_layout(tmp_path):
    images = pa.array([{"bytes": _png(i), "path": f"{i}.png"} for i in range(6)])
    hf = {"info": {"features": {"label": {"_type": "ClassLabel", "names": ["x", "y", "z"]}}}}
    table = pa.table({"id": list(range(6)), "image": images, "label": [0, 1, 2, 0, None, 2]})
    table = table.replace_schema_metadata({"huggingface": json.dumps(hf)})
    pq.write_table(table, tmp_path / "d.parquet")
    source = parquet_file(tmp_path / "d.parquet")
    assert source.class_names == ("x", "y", "z") and source.labels.tolist() == [0, 1, 2, 0, -1, 2]
    first = next(source.samples())
    assert first.key == "row00000000" and first.members == {"png": _png(0)} and first.label == 0

    pq.write_table(pa.table({"img": [_png(0), _png(1)], "kind": ["b", "a"]}), tmp_path / "s.parquet")
    source = parquet_file(tmp_path / "s.parquet", label_column="kind")
    assert source.class_names == ("a", "b") and source.labels.tolist() == [1, 0]
    with pytest.raises(DataError) as excinfo:
        parquet_file(tmp_path / "s.parquet", image_column="pixels")
    _one_line_error(excinfo, "'pixels'", "s.parquet")


def test_demo_source_split():
    train, test = demo("train"), demo("test")
    assert (train.total, test.total) == (898, 899) and train.num_classes == 10
    assert train.class_names == tuple("0123456789")
    assert np.abs(np.bincount(train.labels) - np.bincount(test.labels)).max() <= 1  # stratified
    train_keys = {s.key for s in train.samples()}
    assert len(train_keys) == 898 and not train_keys & {s.key for s in test.samples()}
    sample = next(train.samples())
    image = Image.open(io.BytesIO(sample.members["png"]))
    assert (image.format, image.mode, image.size) == ("PNG", "L", (8, 8)) and 0 <= sample.label <= 9


def test_make_shards_folder_split_in_process(tmp_path, capsys):
    root = tmp_path / "images"
    for c, i in itertools.product("ab", range(10)):
        (root / c).mkdir(parents=True, exist_ok=True)
        (root / c / f"{i}.png").write_bytes(_png(i))
    assert make_shards_main([str(root), str(tmp_path / "out"), "--test-fraction", "0.2"]) == 0
    train, test = resolve_shards(str(tmp_path / "out/train")), resolve_shards(str(tmp_path / "out/test"))
    assert (train.num_samples, test.num_samples, train.num_classes) == (16, 4, 2)
    assert sorted(read_manifest(tmp_path / "out/test")["label"].to_pylist()) == [0, 0, 1, 1]
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert make_shards_main([str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: SOURCE:")


def test_make_shards_cli_demo(tmp_path):
    command = [sys.executable, "launch/make_shards.py", "demo", str(tmp_path / "digits")]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 2
    train = resolve_shards(str(tmp_path / "digits/train"))
    test = resolve_shards(str(tmp_path / "digits/test"))
    assert (train.num_samples, test.num_samples, train.num_classes) == (898, 899, 10)
    assert len(train.urls) == len(test.urls) == 9

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert second.returncode == 2
    assert second.stderr.strip().count("\n") == 0 and second.stderr.startswith("error: OUT:")
    assert "--overwrite" in second.stderr


# --- multi-member samples: clips and several images ---------------------------------------------------

CLIPS = {f"c{i:02d}": np.random.default_rng(100 + i).integers(0, 256, (3 + i % 4, 8, 8, 3), dtype=np.uint8)
         for i in range(12)}


def _clip_members(clip: np.ndarray, clip_format: str) -> dict[str, bytes]:
    if clip_format == "npy":
        return {"npy": npy_bytes(clip)}
    return {f"{t:03d}.png": png_bytes(frame) for t, frame in enumerate(clip)}


class _Frames:
    """A clip's frames (T, H, W, C) and T, as tensors."""

    def __call__(self, sample):
        return {"frames": torch.from_numpy(sample.frames()), "count": sample.num_frames}


def _clip_folder(root: Path) -> dict[str, np.ndarray]:
    """CLIPS as frame folders root/<class>/<clip>/f<t>.png (c00..c05 in class a, the rest in b); {key: clip}."""
    keys = {}
    for i, (name, clip) in enumerate(CLIPS.items()):
        folder = root / ("a" if i < 6 else "b") / name
        folder.mkdir(parents=True)
        for t, frame in enumerate(clip):
            (folder / f"f{t}.png").write_bytes(png_bytes(frame))
        keys[f"{folder.parent.name}_{name}"] = clip
    return keys


@pytest.mark.parametrize("clip_format", ["npy", "frames"])
@pytest.mark.parametrize("writer", ["write_shards", "cli"])
def test_clips_round_trip_once_per_epoch_across_ranks_and_workers(tmp_path, capsys, writer, clip_format):
    if writer == "write_shards":
        samples = [Sample(key, _clip_members(clip, clip_format), i % 3) for i, (key, clip) in enumerate(CLIPS.items())]
        shards = write_shards(samples, tmp_path / "out", samples_per_shard=3, progress=False)
        expected = dict(CLIPS)
        labels = {key: i % 3 for i, key in enumerate(CLIPS)}
    else:
        expected = _clip_folder(tmp_path / "clips")
        argv = [str(tmp_path / "clips"), str(tmp_path / "out"), "--clips", "--samples-per-shard", "3"]
        assert make_shards_main(argv + ["--clip-format", clip_format]) == 0
        total = sum(len(clip) for clip in CLIPS.values())
        summary = capsys.readouterr().out.strip()
        assert summary.startswith(f"{tmp_path / 'out'}: 12 clips ({total} frames), 4 shards, 2 classes (")
        shards = resolve_shards(str(tmp_path / "out"))
        assert shards.class_names == ("a", "b")
        labels = {key: int(key.startswith("b")) for key in expected}
    table = read_manifest(tmp_path / "out")
    assert dict(zip(table["key"].to_pylist(), table["frames"].to_pylist(), strict=True)) == {
        key: len(clip) for key, clip in expected.items()
    }
    suffixes = set()
    for url in shards.urls:
        with tarfile.open(url) as tar:
            suffixes |= {name.split(".", 1)[1] for name in tar.getnames()} - {"cls"}
    assert suffixes == ({"npy"} if clip_format == "npy" else {f"{t:03d}.png" for t in range(6)})

    seen = Counter()
    for rank in range(2):
        for batch in build_loader(shards, _Frames(), batch_size=1, rank=rank, world_size=2, num_workers=2,
                                  resampled=False, drop_last=False):
            key, frames = batch["key"][0], batch["frames"][0].numpy()
            seen[key] += 1
            assert frames.dtype == np.uint8 and np.array_equal(frames, expected[key])  # every frame, in order
            assert batch["count"].tolist() == [len(expected[key])] and batch["label"].tolist() == [labels[key]]
            assert batch["skipped"] == 0
    assert seen == Counter(list(expected))


def test_manifest_hashes_members_in_name_order(tmp_path):
    frames = [_png(i) for i in range(3)]
    clip = CLIPS["c00"]
    samples = [
        Sample("frames", {"002.png": frames[2], "000.png": frames[0], "001.png": frames[1]}),
        Sample("clip", {"npy": npy_bytes(clip)}),
        Sample("single", image=frames[0], ext="png", label=1),
    ]
    write_shards(samples, tmp_path, progress=False)
    rows = {row["key"]: row for row in read_manifest(tmp_path).to_pylist()}
    assert rows["frames"]["sha256"] == hashlib.sha256(b"".join(frames)).hexdigest()
    assert rows["frames"]["nbytes"] == sum(map(len, frames)) and rows["frames"]["frames"] == 3
    assert rows["clip"]["sha256"] == hashlib.sha256(npy_bytes(clip)).hexdigest() and rows["clip"]["frames"] == 3
    assert rows["single"]["sha256"] == hashlib.sha256(frames[0]).hexdigest() and rows["single"]["frames"] == 1


def test_old_manifest_without_frames_still_reads(tmp_path):
    shards = _write(tmp_path, 12, 5, class_names=("a", "b", "c"))
    table = pq.read_table(tmp_path / MANIFEST_NAME)
    pq.write_table(table.drop_columns(["frames"]), tmp_path / MANIFEST_NAME)
    assert "frames" not in pq.read_schema(tmp_path / MANIFEST_NAME).names
    old = read_manifest(tmp_path)
    assert old.column_names == table.column_names and old["frames"].to_pylist() == [1] * 12
    assert json.loads(old.schema.metadata[b"class_names"]) == ["a", "b", "c"]
    assert resolve_shards(str(tmp_path)) == shards
    assert sum(len(batch["key"]) for batch in _read(shards)) == 12


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"png": b"x", "npy": b"y"}, "expected one of"),
        ({"1.png": b"x"}, ">= 3 digits"),
        ({"000.png": b"x", "0001.png": b"y"}, "one digit count"),
        ({"json": b"{}"}, "expected one of"),
        ({"cls": b"1"}, "expected one of"),
        ({"000.gif": b"x"}, "expected one of"),
        ({"npy": b"not an array"}, "'bad'"),
        ({"npy": npy_bytes(np.zeros((2, 4, 4), np.float32))}, "expected uint8"),
        ({"npy": npy_bytes(np.zeros((4, 4), np.uint8))}, "expected uint8"),
        ({}, "no members"),
    ],
)
def test_invalid_member_names_are_rejected(tmp_path, members, message):
    with pytest.raises(DataError) as excinfo:
        write_shards([Sample("bad", members)], tmp_path, progress=False)
    _one_line_error(excinfo, "OUT: sample 'bad'", message)


def test_make_shards_clip_errors_and_unlabelled_clips(tmp_path, capsys):
    root = tmp_path / "clips"
    (root / "one").mkdir(parents=True)
    for t in range(2):
        (root / "one" / f"{t}.png").write_bytes(png_bytes(CLIPS["c00"][t]))
    assert make_shards_main([str(root), str(tmp_path / "out"), "--clips"]) == 0  # root/<clip>: unlabelled
    assert read_manifest(tmp_path / "out").to_pylist()[0] | {"sha256": None} == {
        "shard": "shard-000000.tar", "key": "one", "label": -1, "nbytes": len(npy_bytes(CLIPS["c00"][:2])),
        "sha256": None, "frames": 2,
    }
    assert "1 clips (2 frames)" in capsys.readouterr().out

    (root / "two").mkdir()
    (root / "two" / "a.png").write_bytes(png_bytes(CLIPS["c00"][0]))
    (root / "two" / "b.png").write_bytes(_png(0, size=6))
    for fmt in ("npy", "frames"):  # the clip is skipped and listed; --strict makes that an error
        assert make_shards_main([str(root), str(tmp_path / fmt), "--clips", "--clip-format", fmt, "--strict"]) == 2
        captured = capsys.readouterr()
        skipped = [line for line in captured.out.splitlines() if line.startswith("  skipped: ")]
        assert len(skipped) == 1 and "two" in skipped[0] and "different sizes" in skipped[0]
        assert captured.err.splitlines()[-1].startswith("error: --strict: 1 item(s)")
    with pytest.raises(DataError) as excinfo:
        list(clip_folder(root).samples())
    _one_line_error(excinfo, "SOURCE: clip", "two", "frame 1 is 6x6")
    assert make_shards_main([str(root), str(tmp_path / "x"), "--clip-format", "frames"]) == 2
    assert "--clips" in capsys.readouterr().err
