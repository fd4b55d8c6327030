"""launch/make_shards.py robustness (:mod:`maskray.data.convert`): undecodable files are skipped and listed,
parallel conversion writes what serial conversion writes, an interrupted conversion resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bytes

from maskray.data import demo, read_manifest
from maskray.data.cli import main as make_shards_main
from maskray.data.convert import PARTS_DIR, REPORT_NAME, convert
from maskray.data.sources import Source
from maskray.errors import DataError


def _folder(root: Path) -> Path:
    """Two classes of 4 PNGs, plus a JPEG of garbage bytes and an empty JPEG."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            (root / name / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 255, (8, 8), dtype=np.uint8)))
    (root / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "b" / "empty.jpg").write_bytes(b"")
    return root


def _contents(directory: Path) -> tuple[list[dict], dict[str, bytes]]:
    """The manifest rows and every tar's bytes."""
    return read_manifest(directory).to_pylist(), {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def test_undecodable_files_are_skipped_listed_and_fail_only_with_strict(tmp_path, capsys) -> None:
    source = _folder(tmp_path / "images")
    argv = [str(source), str(tmp_path / "out"), "--samples-per-shard", "3"]
    assert make_shards_main(argv) == 0
    out = capsys.readouterr().out
    assert "8 samples" in out and f"2 skipped, listed in {tmp_path / 'out' / REPORT_NAME}" in out
    assert sum(line.startswith("  skipped: SOURCE: cannot decode image") for line in out.splitlines()) == 2
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    reasons = sorted(item["reason"] for item in report["skipped"])
    assert len(reasons) == 2 and "bad.jpg" in reasons[0] and "empty.jpg" in reasons[1]
    assert report["samples"] == 8 and report["items_read"] == 10 and report["items_per_second"] > 0
    keys = read_manifest(tmp_path / "out")["key"].to_pylist()
    assert len(keys) == 8 and not any("bad" in key or "empty" in key for key in keys)
    assert not (tmp_path / "out" / PARTS_DIR).exists()

    assert make_shards_main([*argv, "--overwrite", "--strict"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --strict: 2 item(s) could not be decoded and were skipped (listed above)")


def test_parallel_conversion_writes_what_serial_conversion_writes(tmp_path) -> None:
    source = demo("train")
    order = np.random.default_rng(0).permutation(source.total)
    serial = convert(source, order, tmp_path / "serial", samples_per_shard=100, progress=False)
    parallel = convert(source, order, tmp_path / "parallel", samples_per_shard=100, workers=2, progress=False)
    assert parallel.shards.num_samples == serial.shards.num_samples == 898 and len(parallel.shards.urls) == 9
    assert _contents(tmp_path / "parallel") == _contents(tmp_path / "serial")  # same rows, same tar bytes


class _Interrupt(BaseException):
    """Stands in for Ctrl-C / a killed process in the middle of a shard."""


def test_an_interrupted_conversion_resumes_keeping_finished_shards(tmp_path, capsys) -> None:
    source = demo("test")
    order = np.arange(source.total)
    fail_at = int(order[250])  # in the third shard of 100

    def load(i: int):
        if i == fail_at:
            raise _Interrupt
        return source.load(i)

    interrupted = Source(source.description, source.labels, source.class_names, load)
    out = tmp_path / "out"
    with pytest.raises(_Interrupt):
        convert(interrupted, order, out, samples_per_shard=100, progress=False)
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished == ["shard-000000.tar", "shard-000001.tar"] and not list(out.glob("*.partial"))
    stamps = {name: (out / name).stat().st_mtime_ns for name in finished}

    with pytest.raises(DataError, match="another samples_per_shard"):
        convert(source, order, out, samples_per_shard=50, resume=True, progress=False)
    assert make_shards_main(["demo", str(tmp_path / "cli")]) == 0  # the CLI refuses to mix: resume or overwrite
    (tmp_path / "cli" / "train" / PARTS_DIR).mkdir()
    assert make_shards_main(["demo", str(tmp_path / "cli")]) == 2
    assert "holds an interrupted conversion; pass --resume" in capsys.readouterr().err

    resumed = convert(source, order, out, samples_per_shard=100, resume=True, workers=2, progress=False)
    assert resumed.kept_shards == 2 and resumed.items_read == source.total - 200
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == stamps  # not rewritten
    fresh = convert(source, order, tmp_path / "fresh", samples_per_shard=100, progress=False)
    assert _contents(out) == _contents(tmp_path / "fresh") and fresh.shards.num_samples == 899
    assert not (out / PARTS_DIR).exists()


def test_a_registered_source_is_listed_and_written_with_no_other_edit(tmp_path, capsys, monkeypatch) -> None:
    """One register_source call: make_shards lists it, writes each split into its own directory, refuses
    options that do not apply; the registry is restored afterwards."""
    from maskray.data import sources
    from maskray.data.writer import Sample

    monkeypatch.setattr(sources, "NAMED_SOURCES", dict(sources.NAMED_SOURCES))
    rng = np.random.default_rng(0)

    def split(count: int) -> Source:
        pixels = rng.integers(0, 255, (count, 4, 4), dtype=np.uint8)
        labels = np.arange(count) % 2
        return Source("stripes", labels, ("even", "odd"), lambda i: Sample(
            key=f"s{i:03d}", image=png_bytes(pixels[i]), ext="png", label=int(labels[i])))

    sources.register_source("stripes", "two-class 4x4 noise", subdirs=("fit", "val"), modes=False,
                            samples_per_shard=3)(lambda mode: {"fit": split(7), "val": split(4)})
    assert make_shards_main(["--list-sources"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "stripes: two-class 4x4 noise" in listed and any(line.startswith("demo: ") for line in listed)
    assert make_shards_main(["stripes", str(tmp_path / "out")]) == 0
    assert [len(read_manifest(tmp_path / "out" / name)) for name in ("fit", "val")] == [7, 4]
    assert len(list((tmp_path / "out" / "fit").glob("*.tar"))) == 3  # the source's own shard size
    capsys.readouterr()
    assert make_shards_main(["stripes", str(tmp_path / "other"), "--mode", "rgb"]) == 2
    assert "--mode does not apply to 'stripes'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already registered"):
        sources.register_source("stripes", "again")(lambda mode: {})
