"""Video files into clip shards (PyAV, the ``video`` extra): frame count, order and size survive the conversion."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskray.data import build_loader, read_manifest, resolve_shards
from maskray.data.cli import main as make_shards_main

av = pytest.importorskip("av")

WIDTH, HEIGHT = 48, 32


def _level(t: int) -> int:
    return 10 + 20 * t


def _write_video(path: Path, frames: int) -> None:
    """A lossless (FFV1) video whose frame t is a flat grey of level 10 + 20 t."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv444p"
        for t in range(frames):
            image = np.full((HEIGHT, WIDTH, 3), _level(t), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _clips(out: Path) -> dict[str, tuple[np.ndarray, int]]:
    """{key: (frames (T, H, W, C) uint8, label)} read back through the loader."""
    def frames(sample):
        return {"frames": torch.from_numpy(sample.frames())}

    found = {}
    for batch in build_loader(resolve_shards(str(out)), frames, batch_size=1, num_workers=0, drop_last=False):
        found[batch["key"][0]] = (batch["frames"][0].numpy(), int(batch["label"][0]))
    return found


@pytest.mark.parametrize("clip_format", ["npy", "frames"])
def test_videos_become_clips_with_their_frames_in_order(tmp_path, capsys, clip_format):
    _write_video(tmp_path / "videos" / "a" / "one.mkv", 10)
    _write_video(tmp_path / "videos" / "b" / "two.mkv", 7)
    argv = [str(tmp_path / "videos"), str(tmp_path / "whole"), "--clips", "--clip-format", clip_format]
    assert make_shards_main(argv) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith(f"{tmp_path / 'whole'}: 2 clips (17 frames), 1 shards, 2 classes (")
    whole = _clips(tmp_path / "whole")
    assert sorted(whole) == ["a_one", "b_two"]
    clip, label = whole["a_one"]
    assert clip.shape == (10, HEIGHT, WIDTH, 3) and label == 0 and whole["b_two"][1] == 1
    assert np.abs(clip.astype(int) - np.array([_level(t) for t in range(10)])[:, None, None, None]).max() <= 1

    # every 2nd frame, shorter side 16 pixels, pieces of 2 frames (the incomplete tail dropped)
    argv = [str(tmp_path / "videos"), str(tmp_path / "pieces"), "--clips", "--clip-format", clip_format,
            "--frame-step", "2", "--frame-size", "16", "--clip-length", "2"]
    assert make_shards_main(argv) == 0
    pieces = _clips(tmp_path / "pieces")
    assert sorted(pieces) == ["a_one_s0000", "a_one_s0001", "b_two_s0000", "b_two_s0001"]
    for key, (clip, label) in pieces.items():
        first = 4 * int(key[-1])  # piece s holds kept frames 2s, 2s + 1 = source frames 4s, 4s + 2
        assert clip.shape == (2, 16, 24, 3) and label == int(key.startswith("b"))
        assert np.abs(clip[:, 8, 12, 0].astype(int) - [_level(first), _level(first + 2)]).max() <= 1
    assert read_manifest(tmp_path / "pieces")["frames"].to_pylist() == [2, 2, 2, 2]


def test_missing_pyav_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    _write_video(tmp_path / "videos" / "one.mp4", 3)
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    assert make_shards_main([str(tmp_path / "videos"), str(tmp_path / "out"), "--clips"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "maskray[video]" in err


def test_clip_options_need_clips(tmp_path, capsys):
    assert make_shards_main(["demo", str(tmp_path / "out"), "--frame-step", "2"]) == 2
    assert "--frame-step applies only with --clips" in capsys.readouterr().err


def test_frame_folders_take_the_same_step_size_and_length_options(tmp_path):
    from helpers import png_bytes

    folder = tmp_path / "clips" / "walk"
    folder.mkdir(parents=True)
    for t in range(9):
        (folder / f"f{t}.png").write_bytes(png_bytes(np.full((HEIGHT, WIDTH), _level(t), dtype=np.uint8)))
    argv = [str(tmp_path / "clips"), str(tmp_path / "out"), "--clips", "--frame-step", "3", "--frame-size", "8",
            "--clip-length", "2"]
    assert make_shards_main(argv) == 0
    (key, (clip, label)), = _clips(tmp_path / "out").items()  # kept frames 0, 3, 6: one piece of 2, tail dropped
    assert key == "walk_s0000" and label == -1
    assert clip.shape == (2, 8, 12, 1) and clip[:, 4, 6, 0].tolist() == [_level(0), _level(3)]
