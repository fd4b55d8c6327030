"""ZeRO's memory split and worker scaling: maskray's MAE step (ViT-B/16 at 224, decoder 8 x 512) on Ray Train workers.

    python benchmarks/scaling.py [--arch vit_b16] [--stages 0 2 3] [--workers 2] [--batch 2] [--steps 3]
        [--out runs/bench-scaling]

One TorchTrainer run with ``--workers`` workers (gloo, ``DS_ACCELERATOR=cpu``, fp32) builds the ``mae`` objective's
DeepSpeed engine for each ZeRO stage in turn (``build_engine``, the worker's path) and steps it ``--steps`` times
on synthetic images (``--batch`` per worker). After the last backward (Adam states exist, gradients not yet
freed) every rank counts the bytes of the tensors it holds, each storage once: the module's parameters (its
partition under ZeRO-3), their gradients and the gradient partitions of the tensors the optimizer steps, the
optimizer's fp32 master partitions (ZeRO 1-3), the Adam states, and the other tensors the ZeRO optimizer keeps
(reduction buckets, flat buffers). Images/s over the timed steps (all workers together), then the same at 1 worker
for the first stage. 2 CPU cores give 2 workers no headroom: the images/s are as measured, not a scaling claim.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402

from maskray.config import project_root  # noqa: E402

MIB = 2**20


class Ledger:
    """Bytes per category, each storage counted once (ZeRO's module parameters are views into flat buffers)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[category] = self.bytes.get(category, 0) + storage.nbytes()

    def walk(self, category: str, value, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            self.add(category, value)
        elif depth < 3 and isinstance(value, (list, tuple)):
            for item in value:
                self.walk(category, item, depth + 1)
        elif depth < 3 and isinstance(value, dict):
            for item in value.values():
                self.walk(category, item, depth + 1)


def state_bytes(engine, objective) -> dict[str, int]:
    ledger = Ledger()
    for parameter in objective.parameters():
        ledger.add("params", getattr(parameter, "ds_tensor", parameter))
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    stepped = [p for group in inner.param_groups for p in group["params"]]
    for parameter in objective.parameters():
        ledger.add("grads", parameter.grad)
    for parameter in stepped:
        ledger.add("grads", parameter.grad)
    for parameter in stepped:
        ledger.add("master", parameter)
    for state in inner.state.values():
        for value in state.values():
            ledger.add("optimizer", value)
    if wrapper is not inner:
        for value in vars(wrapper).values():
            ledger.walk("zero_buffers", value)
    return ledger.bytes


def train_loop(loop_config: dict) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import gc

    import ray.train

    from maskray.context import RankRandomness, StepContext
    from maskray.engine.deepspeed_setup import build_engine
    from maskray.engine.step import optimizer_step
    from maskray.models import build_encoder
    from maskray.objective import build_objective

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    arch, batch, steps = peers.ARCHS[loop_config["arch"]], loop_config["batch"], loop_config["steps"]
    images = torch.randn(batch, 3, arch.img_size, arch.img_size, generator=torch.Generator().manual_seed(rank))
    sample = {"image": images, "key": [""] * batch, "label": torch.zeros(batch)}
    cpu = torch.device("cpu")
    for stage in loop_config["stages"]:
        config = peers.maskray_config(arch, batch, "fp32", 100, 1.5e-4, (f"train.zero_stage={stage}",
                                                                         f"scaling.workers={world}"))
        torch.manual_seed(0)
        objective = build_objective("mae", config.objective.params, build_encoder(config.model))
        engine = build_engine(objective, config, world, False)
        randomness = RankRandomness(0, rank)
        times = []
        for step in range(steps - 1):
            start = time.perf_counter()
            optimizer_step(engine, objective, iter([sample]), StepContext(step, 100, rank, world,
                                                                          generator=randomness.generator), 1, cpu,
                           torch.float32)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()  # the last step by hand: count after its backward
        out = engine(sample, StepContext(steps - 1, 100, rank, world, generator=randomness.generator))
        engine.backward(out.loss)
        memory = state_bytes(engine, objective)
        engine.step()
        times.append(time.perf_counter() - start)
        timed = times[1:] or times
        result = {"stage": stage, "rank": rank, "world": world, "memory_bytes": memory,
                  "images_per_s": world * batch * len(timed) / sum(timed),
                  "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in objective.parameters())}
        Path(loop_config["out"], f"w{world}-stage{stage}-rank{rank}.json").write_text(json.dumps(result))
        del engine, objective, out
        gc.collect()
    ray.train.report({"done": 1})


def fit(workers: int, stages: list[int], args: argparse.Namespace, out: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"arch": args.arch, "batch": args.batch, "steps": args.steps, "stages": stages,
                           "out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(out / "ray"), name=f"scaling-w{workers}"),
    )
    trainer.fit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_b16", choices=sorted(peers.ARCHS))
    parser.add_argument("--stages", nargs="+", type=int, default=[0, 2, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="images per worker per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=project_root() / "runs" / "bench-scaling")
    args = parser.parse_args()
    import ray

    args.out.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(dir=args.out))
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    ray.init(num_cpus=max(args.workers, 1), runtime_env={"env_vars": env}, log_to_driver=False)
    fit(args.workers, args.stages, args, out)
    fit(1, args.stages[:1], args, out)
    ray.shutdown()

    results = [json.loads(path.read_text()) for path in sorted(out.glob("w*-stage*-rank*.json"))]
    print(f"\n{args.arch}, fp32, batch {args.batch} per worker; MiB per worker (rank 0 / rank 1)")
    print("| workers | ZeRO | params | grads | fp32 master | Adam states | other ZeRO buffers | total | images/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for world in sorted({r["world"] for r in results}, reverse=True):
        for stage in sorted({r["stage"] for r in results if r["world"] == world}):
            ranks = sorted((r for r in results if r["world"] == world and r["stage"] == stage),
                           key=lambda r: r["rank"])

            def cell(key: str, ranks=ranks) -> str:
                return " / ".join(f"{r['memory_bytes'].get(key, 0) / MIB:.0f}" for r in ranks)

            totals = " / ".join(f"{sum(r['memory_bytes'].values()) / MIB:.0f}" for r in ranks)
            speed = ranks[0]["images_per_s"]
            print(f"| {world} | {stage} | {cell('params')} | {cell('grads')} | {cell('master')} | "
                  f"{cell('optimizer')} | {cell('zero_buffers')} | {totals} | {speed:.2f} |")
            rows.append({"workers": world, "stage": stage, "images_per_s": speed, "params": ranks[0]["params"],
                         "memory_mib": [{k: v / MIB for k, v in r["memory_bytes"].items()} for r in ranks]})
    print(json.dumps({"benchmark": "scaling", "host": platform.node(), "torch": torch.__version__,
                      "arch": args.arch, "batch": args.batch, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
