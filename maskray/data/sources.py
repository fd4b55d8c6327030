"""Datasets that can be converted into shards: an image folder, a folder of clips, a Parquet file, or a named
source (the sklearn digits demo, its moving-digit clips, and any other registered one).

Each function returns a :class:`Source`: labels and class names are known up front (for stratified
splits and the manifest), samples are loaded one at a time in any order (``Source.samples(indices)``).

Named sources are datasets generated here or shipped inside a package, written by ``make_shards.py NAME
OUT_DIR``: one :func:`register_source` call adds one (in this module, or in a package that declares it under
the entry-point group ``maskray.sources``), and the command lists, plans and writes it with no other edit.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from maskray.data.manifest import BANDS_MEMBER
from maskray.data.writer import Sample, sanitise_key
from maskray.errors import DataError

FOLDER_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CLIP_FORMATS = ("npy", "frames")
MODES = ("keep", "rgb", "l")
_KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}  # stored as-is; anything else becomes PNG
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")  # what PNG holds; other modes are refused


@dataclass(frozen=True, eq=False)
class Source:
    """A dataset to shard: ``labels`` is (N,) int64 with -1 for unlabelled items; ``load(i)`` reads item i."""

    description: str
    labels: np.ndarray
    class_names: tuple[str, ...]
    load: Callable[[int], Sample]
    groups: np.ndarray | None = None  # (N,) items of one group (pieces of one video) are written together

    @property
    def total(self) -> int:
        return len(self.labels)

    def shuffled(self, indices: np.ndarray, seed: int) -> np.ndarray:
        """``indices`` in a random order (from ``seed``) that keeps the items of a group together, in order."""
        rng = np.random.default_rng(seed)
        if self.groups is None:
            return rng.permutation(indices)
        groups = self.groups[indices]
        order = rng.permutation(np.unique(groups))
        rank = np.empty(int(groups.max()) + 1, dtype=np.int64)
        rank[order] = np.arange(len(order))
        return indices[np.lexsort((indices, rank[groups]))]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def samples(self, indices: Iterable[int] | None = None) -> Iterator[Sample]:
        """Yield the items at ``indices`` (default: all, in source order)."""
        for i in range(self.total) if indices is None else indices:
            yield self.load(int(i))


def split_indices(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (train, test) index arrays, stratified by label when every label occurs at least twice."""
    from sklearn.model_selection import train_test_split

    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if (labels >= 0).any() and counts.min() >= 2 else None
    try:
        train, test = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, stratify=stratify, random_state=seed
        )
    except ValueError as exc:
        raise DataError(f"--test-fraction {test_fraction}: cannot split {len(labels)} samples: {exc}") from exc
    return train, test


def image_folder(path: str | Path, mode: str = "keep") -> Source:
    """Images under ``path`` (recursive; png/jpg/jpeg/webp/bmp/tif/tiff, hidden entries ignored), stored as
    :func:`encode_image` does for ``mode``.

    Images inside a top-level subfolder get that subfolder's index among the sorted subfolders as
    label (class names = subfolder names); images directly in ``path`` are unlabelled. Keys are the
    relative paths without suffix, with ``/`` and ``.`` turned into ``_``.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"SOURCE: image folder '{path}' does not exist or is not a directory")
    files = sorted(_image_files(root))
    if not files:
        raise DataError(f"SOURCE: no images ({', '.join(FOLDER_EXTS)}) found under '{path}'")
    class_names = tuple(sorted({f.parts[0] for f in files if len(f.parts) > 1}))
    class_index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([class_index[f.parts[0]] if len(f.parts) > 1 else -1 for f in files], dtype=np.int64)
    keys = _unique_keys([sanitise_key(f.with_suffix("").as_posix()) for f in files], files, path)

    def load(i: int) -> Sample:
        image, ext = encode_image((root / files[i]).read_bytes(), f"'{root / files[i]}'", mode)
        return Sample(key=keys[i], image=image, ext=ext, label=None if labels[i] < 0 else int(labels[i]))

    return Source(f"image folder {root.resolve()}", labels, class_names, load)


def clip_folder(path: str | Path, clip_format: str = "npy", frame_step: int = 1, short_side: int | None = None,
                clip_length: int | None = None) -> Source:
    """Clips under ``path``: every directory (``path`` included) that directly holds image files is one clip, its
    frames sorted by file name (png/jpg/jpeg/webp/bmp, hidden entries ignored), and every video file
    (:data:`~maskray.data.video.VIDEO_EXTS`, decoded with PyAV, the ``video`` extra) is one clip.

    ``frame_step`` keeps every n-th frame, ``short_side`` resizes frames so that their shorter side has that many
    pixels (aspect kept; area averaging), ``clip_length`` cuts each clip into consecutive clips of that many (kept)
    frames, keyed ``<clip>_s0000``, ``<clip>_s0001``, ... (an incomplete tail is dropped unless it is the only
    one). ``clip_format="npy"`` stores a clip as one uint8 (T, H, W, C) array (C = 1 when every frame is
    greyscale, else 3: RGB; videos are RGB); ``"frames"`` stores each frame as ``000.png``, ``001.jpg``, ...
    (image files as-is when not resized, PNG otherwise). Frames of a clip must share a size. Clips one level
    inside a top-level folder (``path/<class>/<clip>/<frames>`` or ``path/<class>/<video>``) get that folder's
    index among the sorted class folders as label; other clips are unlabelled. Keys are the clips' relative paths
    (a video's without its suffix) with ``/`` and ``.`` turned into ``_`` (the folder's own name for ``path``).
    The pieces of one clip share a ``group`` and are written consecutively (a video is decoded once).
    """
    from maskray.data.video import VIDEO_EXTS, read_video, resized, video_frame_count

    root = Path(path)
    if clip_format not in CLIP_FORMATS:
        raise DataError(f"--clip-format must be one of {', '.join(CLIP_FORMATS)}, got '{clip_format}'")
    for name, value in (("--frame-step", frame_step), ("--frame-size", short_side), ("--clip-length", clip_length)):
        if value is not None and value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")
    if not root.is_dir():
        raise DataError(f"SOURCE: clip folder '{path}' does not exist or is not a directory")
    clips: dict[Path, list[Path]] = {}
    for file in sorted(_image_files(root)):
        clips.setdefault(file.parent, []).append(file)
    videos = sorted(_visible_files(root, VIDEO_EXTS))
    if not clips and not videos:
        raise DataError(f"SOURCE: no clips (folders of {', '.join(FOLDER_EXTS)} images, or {', '.join(VIDEO_EXTS)} "
                        f"videos) found under '{path}'")
    sources = sorted([*clips, *videos])
    class_names = tuple(sorted({d.parts[0] for d in sources if len(d.parts) == 2}))
    class_index = {name: i for i, name in enumerate(class_names)}
    names = [sanitise_key((d.with_suffix("") if d in videos else d).as_posix() if d.parts else root.resolve().name)
             for d in sources]
    _unique_keys(names, sources, path)
    pieces: list[tuple[int, int, int]] = []  # (source index, first kept frame, end), in source order
    for index, clip in enumerate(sources):
        total = video_frame_count(root / clip) if clip in videos else len(clips[clip])
        pieces += [(index, first, end) for first, end in _clip_pieces(-(-total // frame_step), clip_length)]
    keys = [names[i] if clip_length is None else f"{names[i]}_s{first // clip_length:04d}" for i, first, _ in pieces]
    labels = np.array([class_index[sources[i].parts[0]] if len(sources[i].parts) == 2 else -1
                       for i, _, _ in pieces], dtype=np.int64)
    decoded: dict[int, np.ndarray] = {}  # the last video decoded (its pieces are loaded one after another)

    def frames_of(index: int, first: int, end: int) -> list[bytes] | np.ndarray:
        """The piece's encoded frame files (a folder clip, not resized) or its uint8 (T, H, W, C) frames."""
        clip = sources[index]
        if clip in videos:
            if index not in decoded:
                decoded.clear()
                decoded[index] = read_video(root / clip, frame_step, short_side)
            return decoded[index][first:end]
        data = [(root / f).read_bytes() for f in clips[clip][::frame_step][first:end]]
        images = _decode_frames(data, f"clip '{root / clip}'")
        if short_side is None:
            return data if clip_format == "frames" else _clip_array(images)
        grey = all(image.mode == "L" for image in images)
        size = resized(*images[0].size, short_side)
        array = np.stack([np.asarray(image.convert("L" if grey else "RGB").resize(size, Image.BOX))
                          for image in images])
        return array[..., None] if grey else array

    def load(i: int) -> Sample:
        index, first, end = pieces[i]
        where = f"clip '{root / sources[index]}'"
        frames = frames_of(index, first, end)
        if len(frames) == 0:
            raise DataError(f"SOURCE: {where} has no frames {first}..{end - 1} (after --frame-step {frame_step})")
        if clip_format == "npy":
            members = {"npy": _npy_bytes(frames)}
        else:
            width = max(3, len(str(len(frames) - 1)))
            members = {}
            for t, frame in enumerate(frames):
                data = frame if isinstance(frame, bytes) else _png_bytes(frame)
                encoded, ext = encode_image(data, f"frame {t} of {where}", "keep", bands=False)
                members[f"{t:0{width}d}.{ext}"] = encoded
        return Sample(keys[i], members, None if labels[i] < 0 else int(labels[i]))

    options = f", every {frame_step} frame(s)" if frame_step > 1 else ""
    options += f", short side {short_side}" if short_side else ""
    options += f", {clip_length}-frame pieces" if clip_length else ""
    groups = np.array([index for index, _, _ in pieces], dtype=np.int64)
    return Source(f"clip folder {root.resolve()} ({clip_format}{options})", labels, class_names, load, groups)


def _clip_pieces(total: int, length: int | None) -> list[tuple[int, int]]:
    """[first, end) ranges of consecutive ``length``-frame pieces of a clip of ``total`` frames (all of it for
    None; an incomplete tail is dropped unless it is the only piece)."""
    if length is None or total <= length:
        return [(0, total)]
    return [(first, first + length) for first in range(0, total - length + 1, length)]


def parquet_file(
    path: str | Path, image_column: str | None = None, label_column: str | None = None, mode: str = "keep"
) -> Source:
    """Rows of a Parquet file (read into memory) as samples keyed ``row00000000``, ..., images stored as
    :func:`encode_image` does for ``mode``.

    The image column defaults to the first binary column or the first struct column with a binary
    ``bytes`` field (how HuggingFace stores images); the label column defaults to ``label`` when present.
    Integer labels keep their values (class names from HuggingFace ``ClassLabel`` metadata when present,
    else ``"0"``, ``"1"``, ...); string labels are numbered in sorted order. Null labels are unlabelled.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"SOURCE: parquet file '{path}' does not exist")
    try:
        schema = pq.read_schema(file)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"SOURCE: cannot read '{path}' as Parquet: {exc}") from exc
    image_column = image_column or _find_image_column(schema, path)
    if label_column is None and "label" in schema.names:
        label_column = "label"
    for name in (image_column, label_column):
        if name is not None and name not in schema.names:
            raise DataError(f"SOURCE: column '{name}' not in '{path}' (columns: {', '.join(schema.names)})")
    table = pq.read_table(file, columns=[c for c in (image_column, label_column) if c is not None])
    if table.num_rows == 0:
        raise DataError(f"SOURCE: '{path}' has no rows")
    images = table[image_column]
    if pa.types.is_struct(images.type):
        images = pc.struct_field(images, "bytes")
    if not (pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type)):
        raise DataError(f"SOURCE: column '{image_column}' of '{path}' does not hold image bytes ({images.type})")
    if label_column is None:
        labels, class_names = np.full(table.num_rows, -1, dtype=np.int64), ()
    else:
        labels, class_names = _parquet_labels(table[label_column], schema, label_column, path)

    def load(i: int) -> Sample:
        data = images[i].as_py()
        if data is None:
            raise DataError(f"SOURCE: row {i} of '{path}' has no image in column '{image_column}'")
        image, ext = encode_image(data, f"in row {i} of '{path}'", mode)
        return Sample(key=f"row{i:08d}", image=image, ext=ext, label=None if labels[i] < 0 else int(labels[i]))

    return Source(f"parquet {file.resolve()} column {image_column}", labels, class_names, load)


def demo(split: str, mode: str = "keep") -> Source:
    """scikit-learn's digits (1,797 8x8 images, values 0..16), stratified 50/50 split (random_state=0).

    Images are stored as 8-bit grayscale PNG at 8x8 (values scaled 0..16 -> 0..255; RGB PNG for ``mode="rgb"``);
    labels 0..9.
    ``split`` is ``"train"`` (898 images) or ``"test"`` (899 images).
    """
    pixels, all_labels, index = _digits_split(split)

    def load(i: int) -> Sample:
        j = int(index[i])
        buffer = io.BytesIO()
        Image.fromarray(pixels[j]).convert("RGB" if mode == "rgb" else "L").save(buffer, format="PNG")
        return Sample(key=f"digits_{j:04d}", image=buffer.getvalue(), ext="png", label=int(all_labels[j]))

    description = f"sklearn load_digits, {split} half of a stratified 50/50 split (random_state=0)"
    return Source(description, all_labels[index], tuple(str(c) for c in range(10)), load)


DEMO_CLIP_FRAMES, DEMO_CLIP_CANVAS, DEMO_CLIP_DIGIT = 8, 32, 24


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixels (1797, 8, 8) uint8 0..255, labels (1797,), the indices of ``split``) of :func:`demo`'s split."""
    if split not in ("train", "test"):
        raise DataError(f"SOURCE: demo split must be 'train' or 'test', got '{split}'")
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train, test = split_indices(labels, 0.5, seed=0)
    return pixels, labels, train if split == "train" else test


def moving_digit_clip(digit: np.ndarray, seed: int, frames: int = DEMO_CLIP_FRAMES,
                      canvas: int = DEMO_CLIP_CANVAS, size: int = DEMO_CLIP_DIGIT) -> np.ndarray:
    """A uint8 (frames, canvas, canvas) clip: ``digit`` (8x8) upsampled to ``size`` (bilinear) moving on a black
    canvas from a random start with a random velocity of 1..2 pixels per frame on each axis, bouncing off the
    borders. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    sprite = np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR))
    room = canvas - size
    position = rng.integers(0, room + 1, size=2)
    velocity = rng.integers(1, 3, size=2) * rng.choice([-1, 1], size=2)
    clip = np.zeros((frames, canvas, canvas), dtype=np.uint8)
    for t in range(frames):
        top, left = position
        clip[t, top:top + size, left:left + size] = sprite
        for axis in range(2):
            step = position[axis] + velocity[axis]
            if not 0 <= step <= room:
                velocity[axis] = -velocity[axis]
            position[axis] = min(max(position[axis] + velocity[axis], 0), room)
    return clip


def demo_clips(split: str, as_frames: bool = False) -> Source:
    """Moving-digit clips of :func:`demo`'s ``split`` (:func:`moving_digit_clip`, seeded by the digit's index),
    labelled by the digit, stored as uint8 (T, H, W, 1) ``npy`` clips; ``as_frames``: one grey PNG frame of
    each clip instead (frame ``index % T``), labelled images for k-NN and probes of a model trained on clips."""
    pixels, labels, index = _digits_split(split)

    def load(i: int) -> Sample:
        j = int(index[i])
        clip = moving_digit_clip(pixels[j], seed=j)[..., None]
        if as_frames:
            frame = _png_bytes(clip[j % len(clip)])
            return Sample(key=f"digit_frame_{j:04d}", image=frame, ext="png", label=int(labels[j]))
        return Sample(key=f"digit_clip_{j:04d}", members={"npy": _npy_bytes(clip)}, label=int(labels[j]))

    what = "one frame of each" if as_frames else f"{DEMO_CLIP_FRAMES}-frame"
    description = (f"sklearn load_digits moving on a {DEMO_CLIP_CANVAS}x{DEMO_CLIP_CANVAS} canvas, {what} clip, "
                   f"{split} half of a stratified 50/50 split (random_state=0)")
    return Source(description, labels[index], tuple(str(c) for c in range(10)), load)


@dataclass(frozen=True)
class NamedSource:
    """A dataset written by name: ``splits(mode)`` gives the :class:`Source` of each shard directory ``subdirs``
    under OUT_DIR (``mode``: ``--mode``, ``keep`` when not given; ``modes`` False refuses ``--mode``)."""

    name: str
    description: str
    subdirs: tuple[str, ...]
    splits: Callable[[str], dict[str, Source]]
    modes: bool = True
    samples_per_shard: int = 100  # small shards: every rank and loader worker of a demo run gets some


NAMED_SOURCES: dict[str, NamedSource] = {}


def register_source(name: str, description: str, subdirs: tuple[str, ...] = ("train", "test"), modes: bool = True,
                    samples_per_shard: int = 100) -> Callable[[Callable[[str], dict[str, Source]]],
                                                          Callable[[str], dict[str, Source]]]:
    """Decorator: ``@register_source("demo", "...") def splits(mode) -> {"train": Source, "test": Source}``
    makes ``make_shards.py demo OUT_DIR`` write each split into ``OUT_DIR/<subdir>``."""

    def register(splits: Callable[[str], dict[str, Source]]) -> Callable[[str], dict[str, Source]]:
        if name in NAMED_SOURCES and NAMED_SOURCES[name].splits is not splits:
            raise ValueError(f"source {name!r} is already registered")
        NAMED_SOURCES[name] = NamedSource(name, description, tuple(subdirs), splits, modes, samples_per_shard)
        return splits

    return register


def named_sources() -> dict[str, NamedSource]:
    """Every registered named source, those of the ``maskray.sources`` entry points included, by name."""
    for point in entry_points(group="maskray.sources"):
        point.load()
    return dict(sorted(NAMED_SOURCES.items()))


@register_source("demo", "scikit-learn's digits (8x8 grey, 10 classes), a stratified 50/50 split into "
                 "OUT_DIR/train and OUT_DIR/test")
def _demo_splits(mode: str) -> dict[str, Source]:
    return {"train": demo("train", mode), "test": demo("test", mode)}


@register_source("demo-clips", f"the train digits moving on a {DEMO_CLIP_CANVAS}x{DEMO_CLIP_CANVAS} canvas as "
                 f"{DEMO_CLIP_FRAMES}-frame clips into OUT_DIR/clips, one labelled frame of each train / test clip "
                 "into OUT_DIR/train / OUT_DIR/test", subdirs=("clips", "train", "test"), modes=False)
def _demo_clip_splits(mode: str) -> dict[str, Source]:
    return {"clips": demo_clips("train"), "train": demo_clips("train", as_frames=True),
            "test": demo_clips("test", as_frames=True)}


def _image_files(root: Path) -> Iterator[Path]:
    """Image files under ``root`` (recursive), relative to it, skipping hidden files and folders."""
    return _visible_files(root, FOLDER_EXTS)


def _visible_files(root: Path, exts: tuple[str, ...]) -> Iterator[Path]:
    """Files under ``root`` (recursive) with a suffix in ``exts``, relative to it, skipping hidden entries."""
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.suffix.lower() in exts and p.is_file() and not any(part.startswith(".") for part in rel.parts):
            yield rel


def _unique_keys(keys: list[str], paths: list[Path], path: str | Path) -> list[str]:
    """``keys`` (one per path), checked to be distinct."""
    first: dict[str, Path] = {}
    for key, p in zip(keys, paths, strict=True):
        if key in first:
            raise DataError(f"SOURCE: '{first[key]}' and '{p}' in '{path}' both map to sample key '{key}'")
        first[key] = p
    return keys


def _decode_frames(frames: list[bytes], where: str) -> list[Image.Image]:
    """The encoded ``frames`` of a clip, decoded and checked to share a size."""
    images = []
    for t, data in enumerate(frames):
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"SOURCE: cannot decode frame {t} of {where}: {exc}") from exc
        if images and image.size != images[0].size:
            (w0, h0), (w, h) = images[0].size, image.size
            raise DataError(f"SOURCE: {where} has frames of different sizes: frame 0 is {w0}x{h0}, "
                            f"frame {t} is {w}x{h}")
        images.append(image)
    return images


def _clip_array(images: list[Image.Image]) -> np.ndarray:
    """The uint8 (T, H, W, C) stack of a clip's frames (C = 1 if all are greyscale, else 3)."""
    grey = all(image.mode == "L" for image in images)
    array = np.stack([np.asarray(image.convert("L" if grey else "RGB")) for image in images])
    return array[..., None] if grey else array


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _png_bytes(frame: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, 1 | 3) frame."""
    buffer = io.BytesIO()
    Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).save(buffer, format="PNG")
    return buffer.getvalue()


def _find_image_column(schema: pa.Schema, path: str | Path) -> str:
    for field in schema:
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            return field.name
        if pa.types.is_struct(field.type):
            inner = field.type.field("bytes") if field.type.get_field_index("bytes") >= 0 else None
            if inner is not None and (pa.types.is_binary(inner.type) or pa.types.is_large_binary(inner.type)):
                return field.name
    raise DataError(f"SOURCE: no image column (binary, or struct with 'bytes') in '{path}'; pass --image-column")


def _parquet_labels(
    column: pa.ChunkedArray, schema: pa.Schema, name: str, path: str | Path
) -> tuple[np.ndarray, tuple[str, ...]]:
    """(labels (N,) int64 with -1 for nulls, class names) from a Parquet label column."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = column.to_pylist()
        names = tuple(sorted({v for v in values if v is not None}))
        index = {v: i for i, v in enumerate(names)}
        return np.array([-1 if v is None else index[v] for v in values], dtype=np.int64), names
    if not pa.types.is_integer(column.type):
        raise DataError(f"SOURCE: label column '{name}' of '{path}' has type {column.type}, not int or string")
    labels = column.fill_null(-1).to_numpy().astype(np.int64)
    if (labels < -1).any():
        raise DataError(f"SOURCE: label column '{name}' of '{path}' has negative labels")
    names = _huggingface_class_names(schema, name)
    if not names and (labels >= 0).any():
        names = tuple(str(c) for c in range(int(labels.max()) + 1))
    if names and labels.max() >= len(names):
        raise DataError(f"SOURCE: label {labels.max()} in '{path}' exceeds its {len(names)} class names")
    return labels, names


def _huggingface_class_names(schema: pa.Schema, name: str) -> tuple[str, ...]:
    """Class names of a HuggingFace ``ClassLabel`` feature stored in the schema metadata, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return ()
    feature = json.loads(raw).get("info", {}).get("features", {}).get(name, {})
    return tuple(feature.get("names", ())) if feature.get("_type") == "ClassLabel" else ()


def encode_image(data: bytes, where: str, mode: str = "keep", bands: bool = True) -> tuple[bytes, str]:
    """(bytes, member name) of one source image.

    ``mode="keep"``: PNG/JPEG/WebP bytes unchanged, other single images re-encoded as PNG in their own mode
    (1, L, LA, P, RGB, RGBA, 16-bit grey; other modes are a DataError) and a multi-page TIFF, when ``bands``, as
    ``bands.npy``: its pages (each one band, L or 16-bit grey, all of one size and depth) as a uint8/uint16
    (H, W, pages) array. ``"rgb"`` / ``"l"``: every image converted to RGB / L (the first page of a TIFF), kept
    as-is only when it already is a PNG/JPEG/WebP of that mode.
    """
    if mode not in MODES:
        raise DataError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
    try:
        with Image.open(io.BytesIO(data)) as image:
            ext = _KEPT_FORMATS.get(image.format)
            if mode == "keep" and getattr(image, "n_frames", 1) > 1 and image.format == "TIFF":
                if not bands:
                    raise DataError(f"SOURCE: {where} is a multi-page TIFF; clip frames must be single images")
                return _bands(image, where), BANDS_MEMBER
            target = {"keep": image.mode, "rgb": "RGB", "l": "L"}[mode]
            if ext is not None and image.mode == target:
                return data, ext
            if target not in _PNG_MODES:
                raise DataError(f"SOURCE: image {where} has mode {target}, which make_shards does not keep "
                                f"(supported: {', '.join(_PNG_MODES)}); pass --mode rgb or --mode l")
            buffer = io.BytesIO()
            image.convert(target).save(buffer, format="PNG")
            return buffer.getvalue(), "png"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"SOURCE: cannot decode image {where}: {exc}") from exc


def _bands(image: Image.Image, where: str) -> bytes:
    """``.npy`` bytes of the (H, W, pages) stack of a multi-page image's single-band pages."""
    pages = []
    for index in range(image.n_frames):
        image.seek(index)
        if image.mode not in ("L", "I;16", "I;16B"):
            raise DataError(f"SOURCE: page {index} of {where} has mode {image.mode}; a band image's pages must "
                            "each be one 8- or 16-bit band (L, I;16)")
        pages.append(np.asarray(image).astype(np.uint8 if image.mode == "L" else np.uint16))
    if len({(page.shape, page.dtype) for page in pages}) > 1:
        raise DataError(f"SOURCE: the pages of {where} differ in size or bit depth")
    buffer = io.BytesIO()
    np.save(buffer, np.stack(pages, axis=-1), allow_pickle=False)
    return buffer.getvalue()
