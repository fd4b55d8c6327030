"""The data path on this machine's cores: JPEG decode + maskray's training augmentation per core, and GPU decode.

    python benchmarks/gpu/data_path.py [--images 256] [--size 500x375] [--workers N] [--device cuda] [--json-out F]

``--images`` photo-sized JPEGs (``--size``, ImageNet's typical 500x375, quality 90, smooth random content as
``benchmarks/data_loader.py`` makes them) are written to a temporary folder, then timed:

- ``cpu_1``: one process, PIL decode + RGB + ``ImageTransform(224, train=True)`` (random resized crop, flip,
  normalise: a run's training transform) per image: images/s of one core;
- ``cpu_all``: the same in a pool of ``--workers`` processes (default: every core), images/s in all and per core;
- ``gpu_decode`` (CUDA only): ``torchvision.io.decode_jpeg(device='cuda')`` on batches of 64 files' bytes, then a
  random resized crop to 224 on the GPU; images/s, and its ratio to ``cpu_all`` ("helps" when above 1).

The last line is one JSON object. Imports neither Ray nor MLflow.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from maskray.data.transforms import ImageTransform  # noqa: E402

IMG_SIZE = 224


def write_jpegs(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """``count`` smooth random RGB JPEGs (noise at 1/8 resolution, bicubic-upsampled: photo-like file sizes)."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        small = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(small).resize((width, height), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def decode_augment(paths: list[str]) -> int:
    """Decode + train transform of each file in this process (one thread); the number done."""
    torch.set_num_threads(1)
    transform = ImageTransform(IMG_SIZE, train=True)
    for path in paths:
        with open(path, "rb") as handle:
            image = Image.open(io.BytesIO(handle.read())).convert("RGB")
        transform(image)
    return len(paths)


def cpu_rates(paths: list[Path], workers: int) -> dict:
    names = [str(p) for p in paths]
    decode_augment(names[:8])  # imports and first-call costs out of the timing
    start = time.perf_counter()
    decode_augment(names)
    one = len(names) / (time.perf_counter() - start)
    chunks = [names[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(decode_augment, [c[:2] for c in chunks]))  # start the workers
        start = time.perf_counter()
        done = sum(pool.map(decode_augment, chunks))
        seconds = time.perf_counter() - start
    return {"cpu_1_images_per_s": one, "cpu_all_images_per_s": done / seconds,
            "cpu_all_per_core_images_per_s": done / seconds / workers, "workers": workers}


def gpu_rate(paths: list[Path], device: torch.device, batch: int = 64) -> dict:
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    batches = [data[i:i + batch] for i in range(0, len(data), batch)]

    def run(chunk):
        images = decode_jpeg(chunk, device=device)
        out = []
        for image in images:  # a random resized crop (scale 0.2-1) to 224, as the CPU transform does
            _, height, width = image.shape
            side = int(min(height, width) * float(torch.empty(1).uniform_(0.45, 1.0)))
            top, left = (int(torch.randint(0, max(dim - side, 0) + 1, (1,))) for dim in (height, width))
            crop = image[None, :, top:top + side, left:left + side].float()
            out.append(torch.nn.functional.interpolate(crop, size=(IMG_SIZE, IMG_SIZE), mode="bilinear"))
        return torch.cat(out)

    run(batches[0])
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for chunk in batches:
        run(chunk)
    torch.cuda.synchronize(device)
    return {"gpu_decode_images_per_s": len(data) / (time.perf_counter() - start), "gpu_batch": batch}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json-out", help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="maskray-data-path-") as tmp:
        paths = write_jpegs(Path(tmp), args.images, width, height)
        mean_kib = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        result = {"benchmark": "data_path", "images": args.images, "size": args.size, "mean_file_kib": mean_kib,
                  "cores": os.cpu_count(), **cpu_rates(paths, args.workers)}
        if device.type == "cuda":
            result.update(gpu_rate(paths, device))
            result["gpu_vs_cpu_all"] = result["gpu_decode_images_per_s"] / result["cpu_all_images_per_s"]
    line = (f"{args.images} JPEGs {args.size} ({mean_kib:.0f} KiB): one core {result['cpu_1_images_per_s']:.0f} "
            f"img/s, {args.workers} workers {result['cpu_all_images_per_s']:.0f} img/s "
            f"({result['cpu_all_per_core_images_per_s']:.0f} per core)")
    if "gpu_decode_images_per_s" in result:
        line += (f", GPU decode+crop {result['gpu_decode_images_per_s']:.0f} img/s "
                 f"({result['gpu_vs_cpu_all']:.2f}x all cores)")
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
