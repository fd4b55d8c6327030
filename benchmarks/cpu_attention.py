"""Attention forward + backward on CPU: torch's SDPA vs timm's explicit ``softmax(q k^T * scale) v``, fp32 and bf16,
at the MAE step's shapes (ViT-S/16 encoder on 49 visible patches + CLS; the 8 x 512 x 16-head decoder on 197
tokens), batch 8. Why a bf16 CPU engine switches attention to the explicit form (``set_fused_attention``).

    python benchmarks/cpu_attention.py [--reps 5] [--calls 3]

Each (shape, dtype, form) keeps its best mean of ``--calls`` calls over ``--reps`` alternating repetitions. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = {"encoder": (8, 6, 50, 64), "decoder": (8, 16, 197, 32)}


def forms(q, k, v, grad):
    scale = q.shape[-1] ** -0.5
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v).backward(grad),
        "explicit": lambda: (((q * scale) @ k.transpose(-2, -1)).softmax(-1) @ v).backward(grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    best: dict[tuple[str, str, str], float] = {}
    for _ in range(args.reps):
        for name, shape in SHAPES.items():
            for dtype in (torch.float32, torch.bfloat16):
                q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
                for form, run in forms(q, k, v, torch.randn(shape, dtype=dtype)).items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        run()
                    key = (name, str(dtype).removeprefix("torch."), form)
                    best[key] = min(best.get(key, float("inf")), (time.perf_counter() - start) / args.calls)
    print("| shape | dtype | SDPA ms | explicit ms |")
    print("|---|---|---|---|")
    for name, shape in SHAPES.items():
        for dtype in ("float32", "bfloat16"):
            print(f"| {name} {shape} | {dtype} | {1000 * best[(name, dtype, 'sdpa')]:.2f} | "
                  f"{1000 * best[(name, dtype, 'explicit')]:.2f} |")
    print(json.dumps({"benchmark": "cpu_attention", "threads": torch.get_num_threads(),
                      "ms": {"/".join(key): 1000 * value for key, value in best.items()}}))


if __name__ == "__main__":
    main()
