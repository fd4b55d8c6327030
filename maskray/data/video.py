"""Video files through PyAV (the optional ``video`` extra): frame counts and decoding with subsampling and resizing.

PyAV is imported on first use, so that everything else works without it; a missing PyAV is a one-line
:class:`~maskray.errors.DataError` naming the extra.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np

from maskray.errors import DataError

VIDEO_EXTS = (".mp4", ".webm", ".ogv", ".avi", ".mkv", ".mov", ".m4v", ".gif")


def _av() -> ModuleType:
    try:
        import av
    except ImportError:
        raise DataError("reading video files needs PyAV: pip install 'maskray[video]'") from None
    return av


def resized(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is ``short_side`` (aspect kept, rounded, >= 1); unchanged
    for None."""
    if short_side is None:
        return width, height
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def video_frame_count(path: str | Path) -> int:
    """The number of frames of the first video stream: the container's count, else the packets counted (no
    decoding). DataError if the file does not open or has no video stream."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"SOURCE: '{path}' has no video stream")
            stream = container.streams.video[0]
            return stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as exc:
        raise DataError(f"SOURCE: cannot open video '{path}': {exc}") from exc


def read_video(path: str | Path, step: int = 1, short_side: int | None = None) -> np.ndarray:
    """Frames 0, step, 2*step, ... of the first video stream as uint8 (T, H, W, 3) RGB, each resized (area
    averaging) so that its shorter side is ``short_side`` while decoding (None: the stored size)."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    av = _av()
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"SOURCE: '{path}' has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if index % step:
                    continue
                width, height = resized(frame.width, frame.height, short_side)
                frames.append(frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
                              .to_ndarray())
    except av.FFmpegError as exc:
        raise DataError(f"SOURCE: cannot decode video '{path}': {exc}") from exc
    if not frames:
        raise DataError(f"SOURCE: video '{path}' decoded to no frames")
    return np.stack(frames)
