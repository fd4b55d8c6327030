"""maskray's DeepSpeed training step, many steps in one process (one rank): ZeRO-0 and ZeRO-2, synthetic images.

    python benchmarks/gpu/train_steps.py [--device cuda] [--arch vit_b16] [--batch 128] [--steps 100]
        [--stages 0 2] [--precision bf16] [--json-out FILE]

Per ZeRO stage: ``peers.MaskrayStep`` (``build_engine`` + the worker's ``optimizer_step``, the ``mae`` objective at
``--arch``, a world-size-1 NCCL group on CUDA, gloo on CPU) trains ``--steps`` steps on a fixed pool of 4 batches of
smooth random images (bicubically upsampled noise: the removed patches are predictable from the visible ones, so a
learning model's loss falls). Reported per stage: the first and last losses, the mean of the first and last tenth,
whether every loss was finite and the last tenth's mean is below the first's, images/s over the steps after the
first tenth (every step ends in a host sync: its loss as a float), and ``max_memory_allocated`` on CUDA. Stages run
one after the other; the first engine is freed before the second. The last line is one JSON object. Imports
neither Ray nor MLflow.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import peers  # noqa: E402


def smooth_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``count`` images of ``size`` pixels: 3-channel noise at 1/8 resolution, bicubic-upsampled, standardised."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.randn(count, 3, max(size // 8, 2), max(size // 8, 2), generator=gen)
    images = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False)
    return (images - images.mean()) / images.std()


def run_stage(stage: int, args: argparse.Namespace, device: torch.device) -> dict:
    arch = peers.ARCHS[args.arch]
    step = peers.MaskrayStep(arch, args.batch, args.precision, steps=args.steps, lr=args.lr,
                             warmup=max(args.steps // 10, 1), device=device, extra=(f"train.zero_stage={stage}",))
    pool = smooth_images(4 * args.batch, arch.img_size).to(device).split(args.batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tenth = max(args.steps // 10, 1)
    losses, start = [], time.perf_counter()
    for index in range(args.steps):
        if index == tenth:
            start = time.perf_counter()
        losses.append(step(pool[index % len(pool)]))
    seconds = time.perf_counter() - start
    timed = args.steps - tenth
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    result = {
        "zero_stage": stage, "steps": args.steps, "batch": args.batch, "first_loss": losses[0],
        "last_loss": losses[-1], "first_tenth_mean": first, "last_tenth_mean": last,
        "all_finite": all(math.isfinite(loss) for loss in losses), "loss_fell": last < first,
        "images_per_s": args.batch * timed / seconds if timed > 0 else None,
        "max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "losses": losses,
    }
    result["ok"] = result["all_finite"] and result["loss_fell"]
    del step, pool
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="vit_b16", choices=sorted(peers.ARCHS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--json-out", help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    stages = []
    for stage in args.stages:
        result = run_stage(stage, args, device)
        memory = result["max_memory_allocated_mib"]
        print(f"ZeRO-{stage} {args.arch} {args.precision} batch {args.batch}: loss {result['first_loss']:.4f} -> "
              f"{result['last_loss']:.4f} (tenths {result['first_tenth_mean']:.4f} -> "
              f"{result['last_tenth_mean']:.4f}), finite {result['all_finite']}, "
              f"{result['images_per_s'] or 0:.1f} img/s" + (f", {memory:.0f} MiB" if memory else ""), flush=True)
        stages.append(result)
    summary = {"benchmark": "train_steps", "device": str(device), "torch": torch.__version__, "arch": args.arch,
               "precision": args.precision, "stages": stages, "ok": all(s["ok"] for s in stages)}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
