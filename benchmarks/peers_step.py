"""One MAE training step in maskray, Hugging Face ViTMAE and lightly at equal architecture (``benchmarks/peers.py``).

    python benchmarks/peers_step.py [--arch vit_s16 ...] [--batch 8] [--precision fp32 bf16] [--steps 4]
        [--warmup 1] [--rounds 2] [--libraries maskray hf lightly] [--no-check]
    python benchmarks/peers_step.py --profile maskray [--arch vit_s16] [--precision bf16] [--batch 8] [--rows 25]
    python benchmarks/peers_step.py --device cuda --arch vit_b16 --precision bf16 --batch 256 --rounds 1

``--device cuda``: the same on the GPU; memory is then ``torch.cuda.max_memory_allocated`` of the step (weights,
gradients, optimizer state, activations), the matmul peak an 8192-square product, the same-weights check on the GPU
in the first ``--precision``.

One step = zero_grad + forward + loss + backward + AdamW on synthetic images (ViT-S/16 or ViT-B/16 at 224, decoder 8
x 512 x 16 heads, mask 0.75, norm-pix). Each (library, arch, precision) runs in its own subprocess, so its peak RSS
(``ru_maxrss``, torch's import included) is its own; the subprocesses alternate library by library within every
round (the order rotates per round) and each keeps its best round. Reported: images/s (median over the timed steps),
peak RSS, the training's memory (peak RSS less the RSS once the library's modules are imported, before the model is
built: weights, gradients, optimizer state, activations and the framework's buffers, the CPU counterpart of
``max_memory_allocated``), GFLOP per image (forward + backward, torch's ``FlopCounterMode`` on one step) and the
fraction of the machine's matmul peak that this reaches (a 2048 x 2048 matmul in the same dtype on all threads,
measured at the start and the end of the run, the best kept). Before the timing, the fp32 losses of the three
libraries for the same weights (HF's copied into maskray, maskray's into lightly), images and mask at the first
``--arch`` (``--no-check`` skips it). The table gives maskray / peer ratios; the last line is one JSON object.
``--profile LIBRARY``: where one step of that library goes instead (``torch.profiler``, the ops by self CPU time,
after ``--warmup`` steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MEMORY = ("peak_rss_mib", "training_mib")  # the largest over the rounds is kept


def matmul_peak(dtype: torch.dtype, size: int | None = None, repeats: int = 5, device: torch.device | str = "cpu"
                ) -> float:
    """Best FLOP/s of a ``size``-square matmul in ``dtype`` (all threads on CPU; default size 2048 on CPU, 8192 on
    CUDA)."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def step_flops(step, images: torch.Tensor) -> float:
    """FLOPs of one training step (forward + backward; the optimizer has no matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(images)
    return float(counter.get_total_flops())


def rss_mib() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> dict:
    """One library's run in this process: warm-up (the first counts FLOPs), timed steps, peak RSS and the
    training's memory above the imported library."""
    arch = peers.ARCHS[args.arch]
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    peers.import_library(args.worker)
    imported = rss_mib()
    step = peers.build_step(args.worker, arch, args.batch, args.precision, device=device)
    images = torch.randn(args.batch, 3, arch.img_size, arch.img_size, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    flops = step_flops(step, images)  # every step ends in a host sync (its loss as a float): timings are complete
    for _ in range(args.warmup):
        step(images)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step(images))
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"images_per_s": args.batch / statistics.median(times), "gflop_per_image": flops / args.batch / 1e9,
              "peak_rss_mib": peak, "training_mib": peak - imported, "losses": losses}
    if device.type == "cuda":  # the device's memory is what counts there: the step's, weights and states included
        result["training_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def profile(args: argparse.Namespace) -> None:
    from torch.profiler import profile as profiler

    arch = peers.ARCHS[args.arch]
    step = peers.build_step(args.profile, arch, args.batch, args.precision, device=torch.device(args.device))
    images = torch.randn(args.batch, 3, arch.img_size, arch.img_size, generator=torch.Generator().manual_seed(0))
    images = images.to(args.device)
    for _ in range(max(args.warmup, 1)):
        step(images)
    with profiler() as prof:
        start = time.perf_counter()
        step(images)
        seconds = time.perf_counter() - start
    print(f"{args.profile} {args.arch} {args.precision} batch {args.batch}: one profiled step {seconds:.3f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def run_worker(library: str, arch: str, precision: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", library, "--arch", arch, "--precision", precision,
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{library} {arch} {precision} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["vit_s16"], choices=sorted(peers.ARCHS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the FLOP-counting one")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each cell keeps its best")
    parser.add_argument("--libraries", nargs="+", default=list(peers.LIBRARIES), choices=peers.LIBRARIES)
    parser.add_argument("--no-check", action="store_true", help="skip the same-weights loss check")
    parser.add_argument("--profile", choices=peers.LIBRARIES, help="profile one step of this library instead")
    parser.add_argument("--rows", type=int, default=25, help="--profile: ops shown")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json-out", help="also write the final JSON object to this file")
    parser.add_argument("--worker", choices=peers.LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile:
        args.arch, args.precision = args.arch[0], args.precision[-1]
        profile(args)
        return
    if args.worker:
        args.arch, args.precision = args.arch[0], args.precision[0]
        print(json.dumps(worker(args)), flush=True)
        return

    device = torch.device(args.device)
    check_precision = "fp32" if device.type == "cpu" else args.precision[0]
    check = None if args.no_check else peers.same_weights_losses(peers.ARCHS[args.arch[0]], device=device,
                                                                 precision=check_precision)
    if check:
        print(f"same weights, images and mask ({args.arch[0]}, {check_precision}, {device.type}): "
              + ", ".join(f"{lib} {loss:.6f}" for lib, loss in check.items()), flush=True)
        if device.type == "cuda":  # the check's models leave the GPU before the steps' processes start
            torch.cuda.empty_cache()
    peak = {name: matmul_peak(dtype, device=device) for name, dtype in DTYPES.items()}
    cells: dict[tuple[str, str, str], dict] = {}
    libraries = list(args.libraries)
    for round_index in range(args.rounds):
        order = libraries[round_index % len(libraries):] + libraries[:round_index % len(libraries)]
        for arch in args.arch:
            for precision in args.precision:
                for library in order:
                    result = run_worker(library, arch, precision, args)
                    print(f"round {round_index} {arch} {precision} {library}: {result['images_per_s']:.2f} img/s, "
                          f"peak {result['peak_rss_mib']:.0f} MiB, training {result['training_mib']:.0f} MiB",
                          flush=True)
                    key = (arch, precision, library)
                    best = cells.get(key)
                    fastest = best if best and best["images_per_s"] > result["images_per_s"] else result
                    cells[key] = {**fastest, **{name: max(result[name], best[name] if best else 0.0)
                                                for name in MEMORY}}
    for name, dtype in DTYPES.items():
        peak[name] = max(peak[name], matmul_peak(dtype, device=device))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\nmatmul peak ({'8192' if device.type == 'cuda' else '2048'}^2, {where}): "
          + ", ".join(f"{name} {value / 1e9:.0f} GFLOP/s" for name, value in peak.items()))
    print("| arch | precision | library | images/s | peak RSS MiB | training MiB | GFLOP/image | % of matmul peak "
          "| maskray / library (img/s) | maskray / library (RSS) | maskray / library (training) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for (arch, precision, library), cell in cells.items():
        ours = cells.get((arch, precision, "maskray"))
        fraction = cell["images_per_s"] * cell["gflop_per_image"] * 1e9 / peak[precision]
        speed = ours["images_per_s"] / cell["images_per_s"] if ours else None
        memory = ours["peak_rss_mib"] / cell["peak_rss_mib"] if ours else None
        training = ours["training_mib"] / cell["training_mib"] if ours else None
        rows.append({"arch": arch, "precision": precision, "library": library, "batch": args.batch,
                     "images_per_s": cell["images_per_s"], "peak_rss_mib": cell["peak_rss_mib"],
                     "training_mib": cell["training_mib"], "maskray_training_memory_ratio": training,
                     "gflop_per_image": cell["gflop_per_image"], "peak_fraction": fraction,
                     "maskray_speed_ratio": speed, "maskray_memory_ratio": memory})
        ratios = " | ".join(f"{value:.2f}x" if value else "–" for value in (speed, memory, training))
        print(f"| {arch} | {precision} | {library} | {cell['images_per_s']:.2f} | {cell['peak_rss_mib']:.0f} "
              f"| {cell['training_mib']:.0f} | {cell['gflop_per_image']:.1f} | {100 * fraction:.0f} % | {ratios} |")
    summary = json.dumps({"benchmark": "peers_step", "host": platform.node(), "torch": torch.__version__,
                          "device": where, "threads": torch.get_num_threads(), "batch": args.batch,
                          "steps": args.steps, "rounds": args.rounds,
                          "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
                          "same_weights_losses": check, "same_weights_precision": check_precision, "rows": rows})
    if args.json_out:
        Path(args.json_out).write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
