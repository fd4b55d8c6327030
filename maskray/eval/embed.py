"""Embed an image folder or a shard set with a pretrained encoder: one Parquet row per image.

Encoder (:func:`resolve_encoder`): the latest checkpoint of a run (``run_id``), a checkpoint directory, or a
weights file written by ``launch/export.py`` (rebuilt from its metadata, :mod:`maskray.weights`). Images go
through the eval transform (resize the shorter side, center crop, normalise): a checkpoint's is its run's
(:meth:`ImageTransform.for_eval`); a weights file's takes the export's image size and channels and ``mean`` /
``std`` as given (default maskray's, 0.5 per channel, ``DataConfig``).

Inputs (:func:`resolve_inputs`): a shard directory (it has ``manifest.parquet``; ids are the sample keys,
labels and class names the shards') or an image folder read in place (as :func:`maskray.data.image_folder`
lists it: recursive, png/jpg/jpeg/webp/bmp, hidden entries skipped, label = index of the top-level subfolder
among the sorted subfolders, -1 directly inside; ids are the relative file names, ``cat/001.png``). Every
image is read once, in order, the last batch partial; one that cannot be decoded stops the run (nothing
written).

Output columns: ``id`` (string), ``label`` (int64, -1: none), ``class_name`` (string, null when unlabelled;
only when class names are known), ``cls`` and ``mean`` (fixed_size_list<float32>[D], :data:`FEATURE_DEFINITIONS`).
File metadata: ``maskray.source`` (JSON: kind, run id, checkpoint, step, weights path, sha256 of the weights
read), ``maskray.arch``, ``maskray.features``, ``maskray.transform``, ``maskray.data``. The file is written
as ``<out>.partial`` and renamed when complete. The work runs as one Ray task like evaluation
(:func:`~maskray.eval.runner.run_as_task`); its progress bar (images/s) shows on the driver.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from maskray import storage
from maskray.checkpoint import ENCODER_FILE, load_encoder, read_checkpoint_config
from maskray.config import DataConfig
from maskray.data import MANIFEST_NAME, ImageTransform, ShardSet, Views, build_loader, resolve_shards
from maskray.data.sources import FOLDER_EXTS
from maskray.errors import ConfigError, DataError
from maskray.eval.features import pooled_features
from maskray.eval.runner import resolve_target, run_as_task
from maskray.models import MaskedViT
from maskray.teachers import file_sha256
from maskray.weights import load_weights, read_weights_metadata, weights_init_kwargs

FEATURE_DEFINITIONS = {
    "cls": "CLS token after the encoder's final norm (unmasked forward, eval mode)",
    "mean": "mean over the patch tokens after the encoder's final norm (CLS excluded)",
}


@dataclass(frozen=True)
class EncoderSource:
    """Where the encoder comes from (``kind``: run, checkpoint or weights; ``path``: its checkpoint directory or
    weights file), the eval transform for it and what the output records about it (``info``)."""

    kind: str
    path: str | Path  # a checkpoint directory (local path or URI) or a weights file
    arch: str
    transform: ImageTransform
    info: dict[str, Any]

    def load(self) -> MaskedViT:
        return load_weights(self.path) if self.kind == "weights" else load_encoder(self.path)[0]


@dataclass(frozen=True)
class ImageFolder:
    """Images under ``root``: ``files`` relative posix paths (sorted), ``labels`` one per file (-1: none)."""

    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class EmbedResult:
    """What :func:`embed` wrote: ``rows`` rows of ``dim``-wide features to ``path`` in ``seconds``."""

    path: Path
    rows: int
    dim: int
    seconds: float


def resolve_encoder(
    run_id: str | None = None,
    checkpoint: str | Path | None = None,
    weights: str | Path | None = None,
    tracking_uri: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> EncoderSource:
    """The :class:`EncoderSource` of exactly one of ``run_id`` / ``checkpoint`` / ``weights`` (see the module
    docstring); ``mean`` / ``std`` only with ``weights``."""
    if sum(value is not None for value in (run_id, checkpoint, weights)) != 1:
        raise ConfigError("give exactly one of --run-id, --checkpoint, --weights")
    if weights is None:
        if mean is not None or std is not None:
            raise ConfigError("--mean/--std apply to --weights only (a checkpoint uses its run's data.mean/data.std)")
        target = resolve_target(tracking_uri, run_id, checkpoint, create_run=False)
        config = read_checkpoint_config(target.checkpoint)
        info = {"kind": "run" if run_id else "checkpoint", "run_id": target.run_id,
                "checkpoint": str(target.checkpoint), "step": target.step,
                "sha256": file_sha256(storage.join(target.checkpoint, ENCODER_FILE))}
        transform = ImageTransform.for_eval(config.model, config.data)
        return EncoderSource(info["kind"], target.checkpoint, config.model.arch, transform, info)
    path = Path(weights).expanduser().resolve()
    metadata = read_weights_metadata(path)
    init = weights_init_kwargs(metadata)
    mean = tuple(DataConfig().mean if mean is None else mean)
    std = tuple(DataConfig().std if std is None else std)
    if len(mean) != len(std) or len(mean) not in {1, 3, init["in_chans"]}:
        raise ConfigError(f"--mean/--std: give 1 or {init['in_chans']} values each, got {len(mean)} and {len(std)}")
    transform = ImageTransform(init["img_size"], train=False, mean=mean, std=std, in_chans=init["in_chans"])
    info = {"kind": "weights", "weights": str(path), "sha256": file_sha256(path),
            "checkpoint": metadata.get("checkpoint"), "step": metadata.get("step")}
    return EncoderSource("weights", path, metadata["arch"], transform, info)


def resolve_inputs(data: str | Path) -> ShardSet | ImageFolder:
    """A shard directory (it has ``manifest.parquet``) or an image folder (DataError when neither)."""
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"--data: '{data}' is not a directory (an image folder or a shard directory)")
    if (root / MANIFEST_NAME).is_file():
        return resolve_shards(str(root), key="--data")
    files = sorted(
        rel for rel in (p.relative_to(root) for p in root.rglob("*") if p.suffix.lower() in FOLDER_EXTS)
        if (root / rel).is_file() and not any(part.startswith(".") for part in rel.parts)
    )
    if not files:
        raise DataError(f"--data: no images ({', '.join(FOLDER_EXTS)}) and no {MANIFEST_NAME} under '{data}'")
    class_names = tuple(sorted({f.parts[0] for f in files if len(f.parts) > 1}))
    index = {name: i for i, name in enumerate(class_names)}
    labels = tuple(index[f.parts[0]] if len(f.parts) > 1 else -1 for f in files)
    return ImageFolder(root, tuple(f.as_posix() for f in files), labels, class_names)


def batches(
    inputs: ShardSet | ImageFolder, transform: ImageTransform, batch_size: int
) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(ids, labels (B,) int64, images (B, C, S, S)) over every input image once, in order, the last batch
    partial."""
    if isinstance(inputs, ImageFolder):
        for start in range(0, len(inputs.files), batch_size):
            names = list(inputs.files[start:start + batch_size])
            images = torch.stack([transform(_open(inputs.root / name)) for name in names])
            yield names, torch.tensor(inputs.labels[start:start + batch_size], dtype=torch.int64), images
        return
    loader = build_loader(inputs, Views(image=transform), batch_size=batch_size, num_workers=0, drop_last=False)
    skipped = 0
    for batch in loader:
        skipped += batch["skipped"]
        yield batch["key"], batch["label"], batch["image"]
    if skipped:
        raise DataError(f"--data: {skipped} of the {inputs.num_samples} samples of '{inputs.root}' could not be read "
                        "(see the warnings above); nothing written")


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"--data: cannot decode image '{path}': {exc}") from None
    return image


def embedding_schema(dim: int, with_class_name: bool, metadata: dict[str, str]) -> pa.Schema:
    """The output schema: ``id``, ``label``, [``class_name``], ``cls`` and ``mean`` as float32 lists of ``dim``."""
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("label", pa.int64(), nullable=False)]
    if with_class_name:
        fields.append(pa.field("class_name", pa.string()))
    fields += [pa.field(name, pa.list_(pa.float32(), dim), nullable=False) for name in FEATURE_DEFINITIONS]
    return pa.schema(fields, metadata=metadata)


def embed_task(source: EncoderSource, inputs: ShardSet | ImageFolder, out: str, batch_size: int) -> EmbedResult:
    """The Ray task body: embed every input image into ``out`` (written as ``<out>.partial``, then renamed)."""
    from ray.experimental.tqdm_ray import tqdm

    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = source.load().to(device).eval()
    class_names = inputs.class_names
    data = str(inputs.root)
    metadata = {"maskray.source": json.dumps(source.info), "maskray.arch": source.arch,
                "maskray.features": json.dumps(FEATURE_DEFINITIONS), "maskray.transform": repr(source.transform),
                "maskray.data": data}
    schema = embedding_schema(encoder.embed_dim, bool(class_names), metadata)
    total = len(inputs.files) if isinstance(inputs, ImageFolder) else inputs.num_samples
    partial = Path(f"{out}.partial")
    rows = 0
    progress = tqdm(total=total, desc=f"embed {Path(data).name}", unit="img")
    try:
        with pq.ParquetWriter(partial, schema) as writer, torch.no_grad():
            for ids, labels, images in batches(inputs, source.transform, batch_size):
                features = pooled_features(encoder(images.to(device)))
                columns: dict[str, Any] = {"id": ids, "label": labels.tolist()}
                if class_names:
                    columns["class_name"] = [class_names[label] if label >= 0 else None for label in columns["label"]]
                for name, values in features.items():
                    flat = pa.array(values.cpu().numpy().reshape(-1))
                    columns[name] = pa.FixedSizeListArray.from_arrays(flat, encoder.embed_dim)
                writer.write_table(pa.table(columns, schema=schema))
                rows += len(ids)
                progress.update(len(ids))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        progress.close()
    os.replace(partial, out)
    return EmbedResult(Path(out), rows, encoder.embed_dim, time.perf_counter() - start)


def embed(
    out: str | Path,
    data: str | Path,
    *,
    run_id: str | None = None,
    checkpoint: str | Path | None = None,
    weights: str | Path | None = None,
    tracking_uri: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 256,
    overwrite: bool = False,
) -> EmbedResult:
    """Check the inputs (an existing ``out`` without ``overwrite`` is refused before Ray starts), then run
    :func:`embed_task` as one Ray task (a local Ray starts when none is running)."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not overwrite:
        raise ConfigError(f"--out: '{path}' exists; pass --overwrite to replace it")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    source = resolve_encoder(run_id, checkpoint, weights, tracking_uri, mean, std)
    inputs = resolve_inputs(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    return run_as_task(embed_task, source, inputs, str(path), batch_size)
