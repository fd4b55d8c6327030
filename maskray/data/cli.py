"""The ``launch/make_shards.py`` command: image folder, clip folder, Parquet file or a named source (the digits
demo, its clips, any registered one: :func:`maskray.data.sources.register_source`) -> shard directories."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from maskray.data.convert import PARTS_DIR, REPORT_NAME, convert
from maskray.data.health import verify_shards
from maskray.data.manifest import ShardSet, read_manifest
from maskray.data.sources import (
    CLIP_FORMATS,
    MODES,
    Source,
    clip_folder,
    image_folder,
    named_sources,
    parquet_file,
    split_indices,
)
from maskray.data.writer import check_out_dir
from maskray.errors import DataError, MaskrayError

SAMPLES_PER_SHARD = 1000
SPLIT_SEED = 0


def build_parser() -> argparse.ArgumentParser:
    sources = named_sources()
    parser = argparse.ArgumentParser(
        prog="make_shards.py",
        description="Write WebDataset shards plus manifest.parquet from an image folder (class subfolders give "
        "labels), a folder of clips (--clips), a .parquet file, or a named source: "
        + "; ".join(f"'{name}' ({source.description})" for name, source in sources.items()) + ".",
    )
    parser.add_argument(
        "source", metavar="SOURCE", nargs="?",
        help=f"an image or clip folder, a .parquet file, or a named source ({', '.join(map(repr, sources))})",
    )
    parser.add_argument("--list-sources", action="store_true", help="print the named sources, then exit")
    parser.add_argument("out_dir", metavar="OUT_DIR", nargs="?", help="output directory")
    parser.add_argument("--verify", metavar="DIR", default=None,
                        help="instead of converting: read every sample of the shard directory DIR and check its bytes "
                        "against the manifest's sha256; lists the samples that differ and exits with code 2 if any")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards and manifest")
    parser.add_argument("--workers", type=_positive_int, default=1,
                        help="processes that load and write shards in parallel (default 1; same output for any N)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted conversion into OUT_DIR with the same arguments: shards it "
                        "finished are kept, the others are written")
    parser.add_argument("--strict", action="store_true",
                        help="exit with code 2 when any item could not be decoded (they are skipped and listed in "
                        f"OUT_DIR/{REPORT_NAME} either way)")
    parser.add_argument(
        "--samples-per-shard",
        type=_positive_int,
        default=None,
        help=f"default {SAMPLES_PER_SHARD} (a named source's own, 100 for the demos)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="if > 0, write a random (stratified when labelled) split into OUT_DIR/train and OUT_DIR/test",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="images: keep each image's mode (default; L, LA, RGB, RGBA, 16-bit grey as PNG, a multi-page TIFF as "
        "one band per page in bands.npy), or convert every image to rgb or l (grey)",
    )
    parser.add_argument("--image-column", default=None, help="Parquet image column (default: auto-detect)")
    parser.add_argument("--label-column", default=None, help="Parquet label column (default: 'label' if present)")
    parser.add_argument(
        "--clips",
        action="store_true",
        help="SOURCE is a folder of clips: every directory directly holding images is one clip (frames sorted by "
        "name) and every video file (mp4, webm, ogv, avi, mkv, mov, m4v, gif; needs PyAV: pip install "
        "'maskray[video]') is one clip; clips in SOURCE/<class>/<clip>/ or SOURCE/<class>/<video> are labelled by "
        "class",
    )
    parser.add_argument(
        "--clip-format",
        choices=CLIP_FORMATS,
        default=None,
        help="with --clips: store a clip as one uint8 (T, H, W, C) npy array (default) or as its frames' images",
    )
    parser.add_argument("--frame-step", type=_positive_int, default=None,
                        help="with --clips: keep every n-th frame (default 1)")
    parser.add_argument("--frame-size", type=_positive_int, default=None,
                        help="with --clips: resize frames so that the shorter side has this many pixels")
    parser.add_argument("--clip-length", type=_positive_int, default=None,
                        help="with --clips: cut each clip or video into consecutive clips of this many frames")
    return parser


def make_shards(argv: Sequence[str] | None = None) -> list[ShardSet]:
    """Run the command (raises MaskrayError on bad input); prints one summary line per written directory."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_sources:
        for name, source in named_sources().items():
            print(f"{name}: {source.description}")
        return []
    if args.verify is not None:
        if args.source or args.out_dir:
            parser.error("--verify DIR takes no SOURCE or OUT_DIR")
        verify(args.verify)
        return []
    if args.source is None or args.out_dir is None:
        parser.error("SOURCE and OUT_DIR are required (or --verify DIR)")
    if not 0.0 <= args.test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    out_dirs = _out_dirs(args)
    if args.resume and args.overwrite:
        raise DataError("--resume and --overwrite exclude each other")
    for out_dir in out_dirs:
        if (out_dir / PARTS_DIR).is_dir() and not (args.resume or args.overwrite):
            raise DataError(f"OUT: '{out_dir}' holds an interrupted conversion; pass --resume to continue it "
                            "(same arguments) or --overwrite to start again")
        if not args.resume:
            check_out_dir(out_dir, args.overwrite)  # refuse before reading the source or writing anything
    named = named_sources().get(args.source)
    default_per_shard = named.samples_per_shard if named else SAMPLES_PER_SHARD
    written, skipped = [], []
    for out_dir, (source, indices) in zip(out_dirs, _plan(args), strict=True):
        done = convert(
            source, indices, out_dir, samples_per_shard=args.samples_per_shard or default_per_shard,
            workers=args.workers, resume=args.resume, overwrite=args.overwrite,
        )
        shards = done.shards
        frames = pc.sum(read_manifest(out_dir, key="OUT")["frames"]).as_py()
        if args.clips or frames > shards.num_samples:  # clips (an image is one frame)
            counts = f"{shards.num_samples} clips ({frames} frames)"
        else:
            counts = f"{shards.num_samples} samples"
        notes = [f"{done.items_per_second:.0f} items/s"]
        if done.kept_shards:
            notes.append(f"{done.kept_shards} shards kept from the interrupted run")
        if done.skipped:
            notes.append(f"{len(done.skipped)} skipped, listed in {Path(out_dir) / REPORT_NAME}")
        print(f"{out_dir}: {counts}, {len(shards.urls)} shards, {shards.num_classes} classes ({'; '.join(notes)})")
        for item in done.skipped:
            print(f"  skipped: {item.reason}")
        written.append(shards)
        skipped += done.skipped
    if args.strict and skipped:
        raise DataError(f"--strict: {len(skipped)} item(s) could not be decoded and were skipped (listed above)")
    return written


def verify(directory: str) -> None:
    """``--verify DIR``: one summary line, one line per bad sample or short shard; DataError when any."""
    good, lost = verify_shards(directory)
    count = sum(item.count for item in lost)
    print(f"{directory}: {good} samples match the manifest's sha256, {count} do not")
    for item in lost:
        where = f"sample '{item.key}' of {item.shard}" if item.key else f"{item.shard} ({item.count} samples)"
        print(f"  bad: {where}: {item.reason}")
    if lost:
        raise DataError(f"--verify: {count} sample(s) of '{directory}' failed verification (listed above)")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        make_shards(argv)
    except MaskrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _out_dirs(args: argparse.Namespace) -> list[Path]:
    """The shard directories to write: OUT_DIR/train and OUT_DIR/test for a split, else OUT_DIR."""
    out = Path(args.out_dir)
    named = named_sources().get(args.source)
    if named:
        return [out / subdir for subdir in named.subdirs]
    return [out / "train", out / "test"] if args.test_fraction > 0 else [out]


def _plan(args: argparse.Namespace) -> list[tuple[Source, np.ndarray]]:
    """(source, indices in write order) for each directory of ``_out_dirs(args)``."""
    mode = args.mode or "keep"
    for option in ("clip_format", "frame_step", "frame_size", "clip_length"):
        if getattr(args, option) and not args.clips:
            raise DataError(f"--{option.replace('_', '-')} applies only with --clips")
    named = named_sources().get(args.source)
    if named:
        if args.test_fraction or args.image_column or args.label_column or args.clips:
            raise DataError(f"SOURCE: '{args.source}' has fixed splits, no columns to choose and no --clips")
        if args.mode and not named.modes:
            raise DataError(f"--mode does not apply to '{args.source}' (it keeps its own modes)")
        splits = named.splits(mode)
        return [(splits[subdir], np.arange(splits[subdir].total)) for subdir in named.subdirs]
    path = Path(args.source)
    if args.mode and args.clips:
        raise DataError("--mode applies to images, not --clips (clips are stored as grey or RGB)")
    if args.clips and not path.is_dir():
        raise DataError(f"SOURCE: --clips needs a folder of clips, '{path}' is not a directory")
    if path.is_dir():
        if args.image_column or args.label_column:
            raise DataError(f"SOURCE: --image-column/--label-column apply to .parquet files, not '{path}'")
        source = (clip_folder(path, args.clip_format or "npy", args.frame_step or 1, args.frame_size, args.clip_length)
                  if args.clips else image_folder(path, mode))
    elif path.suffix == ".parquet":
        source = parquet_file(path, args.image_column, args.label_column, mode)
    elif path.exists():
        raise DataError(f"SOURCE: '{path}' is neither a directory nor a .parquet file")
    else:
        raise DataError(f"SOURCE: '{path}' does not exist (expected an image folder, a .parquet file or one of "
                        f"the named sources {', '.join(map(repr, named_sources()))})")
    if args.test_fraction > 0:
        train, test = split_indices(source.labels, args.test_fraction, seed=SPLIT_SEED)
        if source.groups is not None:  # the pieces of a video together, so that it is decoded once
            train, test = source.shuffled(train, SPLIT_SEED), source.shuffled(test, SPLIT_SEED)
        return [(source, train), (source, test)]
    # shuffled write order, so that shards of a class-sorted folder mix classes
    return [(source, source.shuffled(np.arange(source.total), SPLIT_SEED))]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
