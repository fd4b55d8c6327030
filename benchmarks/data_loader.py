"""maskray's WebDataset pipeline vs torchvision's ``ImageFolder`` + ``DataLoader`` on the same files and the same
augmentation: images/s per loader worker.

    python benchmarks/data_loader.py [--sets demo photos] [--workers 1 2] [--batch 64] [--batches 40]
        [--rounds 2] [--photos 512] [--photo-size 256] [--work runs/bench-data-loader]

Sets: ``demo`` (the bundled digits, 8x8 PNG, cropped to 16x16 as in ``configs/demo/mae.yaml``) and ``photos``
(``--photos`` generated smooth-noise JPEGs of ``--photo-size`` pixels in 10 class folders, cropped to 224x224).
Each set is written once as an image folder (class subfolders), which ``ImageFolder`` reads as it is and
``launch/make_shards.py`` turns into shards, so both loaders decode the same bytes. Both apply the same
``ImageTransform`` (random resized crop, scale 0.35-1, normalisation: ``ImageTransform.for_training`` of a run) to
the decoded PIL image; maskray through ``build_loader`` (shard shuffling, a 1000-sample shuffle buffer,
resampled, the objective's ``Views``), torchvision through ``DataLoader(shuffle=True, drop_last=True)``.
Per (set, workers) the two loaders alternate for ``--rounds`` rounds, each keeps its best; a round times
``--batches`` batches after the first (the workers' start-up excluded). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maskray.config import project_root  # noqa: E402
from maskray.data import resolve_shards  # noqa: E402
from maskray.data.reader import build_loader  # noqa: E402
from maskray.data.transforms import ImageTransform  # noqa: E402
from maskray.data.views import Views  # noqa: E402

IMG_SIZE = {"demo": 16, "photos": 224}


def demo_folder(root: Path) -> None:
    """The bundled digits (train split) as ``root/<label>/<index>.png``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, "L").convert("RGB").save(folder / f"{index:05d}.png")


def photo_folder(root: Path, count: int, size: int) -> None:
    """``count`` smooth random RGB JPEGs (upsampled noise: JPEG sizes like photos') in 10 class folders."""
    generator = np.random.default_rng(0)
    for index in range(count):
        folder = root / str(index % 10)
        folder.mkdir(parents=True, exist_ok=True)
        small = generator.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{index:05d}.jpg", quality=90)


def prepare(name: str, work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """(image folder, shard folder) of set ``name``, written once."""
    folder, shards = work / name / "folder", work / name / "shards"
    if not folder.exists():
        demo_folder(folder) if name == "demo" else photo_folder(folder, args.photos, args.photo_size)
    if not (shards / "manifest.parquet").exists():
        subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), str(folder), str(shards),
                        "--test-fraction", "0", "--overwrite"], check=True, capture_output=True)
    train = shards / "train" if (shards / "train").exists() else shards
    return folder, train


def timed(loader, batches: int) -> float:
    """Images/s over ``batches`` batches after the first."""
    iterator = iter(loader)
    first = next(iterator)
    images = first["image"] if isinstance(first, dict) else first[0]
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def maskray_loader(shards: Path, transform: ImageTransform, batch: int, workers: int):
    return build_loader(resolve_shards(str(shards)), Views(image=transform), batch_size=batch, num_workers=workers,
                        resampled=True, shuffle_buffer=1000, epochs=None,
                        multiprocessing_context="forkserver" if workers else None)


def torchvision_loader(folder: Path, transform: ImageTransform, batch: int, workers: int):
    from torchvision.datasets import ImageFolder

    class Forever(torch.utils.data.Sampler):
        def __init__(self, size: int) -> None:
            self.size = size

        def __iter__(self):
            generator = torch.Generator().manual_seed(0)
            while True:
                yield from torch.randperm(self.size, generator=generator).tolist()

    dataset = ImageFolder(str(folder), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=Forever(len(dataset)), drop_last=True,
                                       num_workers=workers,
                                       multiprocessing_context="forkserver" if workers else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["demo", "photos"], choices=sorted(IMG_SIZE))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--photos", type=int, default=512)
    parser.add_argument("--photo-size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=project_root() / "runs" / "bench-data-loader")
    args = parser.parse_args()
    rows = []
    print("| set | loader workers | maskray (WebDataset) img/s | torchvision ImageFolder img/s | per worker: maskray "
          "| per worker: ImageFolder | maskray / ImageFolder |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sets:
        folder, shards = prepare(name, args.work, args)
        transform = ImageTransform(IMG_SIZE[name], train=True, crop_scale=(0.35, 1.0), mean=(0.5,) * 3,
                                   std=(0.5,) * 3)
        for workers in args.workers:
            best = {"maskray": 0.0, "torchvision": 0.0}
            for round_index in range(args.rounds):
                order = ["maskray", "torchvision"][:: 1 if round_index % 2 == 0 else -1]
                for loader_name in order:
                    loader = (maskray_loader(shards, transform, args.batch, workers) if loader_name == "maskray"
                              else torchvision_loader(folder, transform, args.batch, workers))
                    best[loader_name] = max(best[loader_name], timed(loader, args.batches))
                    del loader
            per = max(workers, 1)
            ratio = best["maskray"] / best["torchvision"]
            rows.append({"set": name, "workers": workers, "maskray_images_per_s": best["maskray"],
                         "imagefolder_images_per_s": best["torchvision"], "ratio": ratio})
            print(f"| {name} | {workers} | {best['maskray']:.0f} | {best['torchvision']:.0f} | "
                  f"{best['maskray'] / per:.0f} | {best['torchvision'] / per:.0f} | {ratio:.2f}x |", flush=True)
    print(json.dumps({"benchmark": "data_loader", "host": platform.node(), "torch": torch.__version__,
                      "batch": args.batch, "batches": args.batches, "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()
