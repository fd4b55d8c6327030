"""A single-process learning probe for tuning an objective's demo config: minutes, not a Ray run.

    python benchmarks/probe.py CONFIG [KEY=VALUE ...]

Builds the config's encoder and objective in this process, streams the config's shards through the objective's
own input transform at the run's *global* batch (``data.batch_size x scaling.workers``), and trains
``train.steps`` steps with the engine's optimizer and warm-up cosine schedule (``build_optimizer``,
``build_scheduler``) but no DeepSpeed and no Ray: one rank, so cross-rank terms see the whole batch, and
``optim.clip_grad`` clips the global gradient norm as DeepSpeed does. Prints the loss and the objective's
metrics ten times, then the k-NN of the evaluation encoder (``Objective.eval_encoder``) before and after, and
ends with one JSON line. Its k-NN follows the full Ray Train run's closely enough to rank settings (the MSN and
MoCo v3 demo views were chosen with it, ``BENCHMARKS.md``); the recorded demo figures come from
``benchmarks/objectives.py``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

# the repository first: this folder's objectives.py (the benchmark) would shadow the objectives plugin package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskray.checkpoint import encoder_from_state
from maskray.config import load_config
from maskray.context import RankRandomness, StepContext
from maskray.data import LoaderOptions, infinite_batches, resolve_shards
from maskray.engine.deepspeed_setup import build_optimizer, build_scheduler, encoder_state
from maskray.eval.protocol import encoder_knn_metrics, eval_shard_sets
from maskray.models import build_encoder
from maskray.objective import build_objective


def knn(objective, config, eval_sets) -> dict[str, float]:
    metrics = encoder_knn_metrics(encoder_from_state(config, encoder_state(objective)), eval_sets, config)
    return {key: round(value, 2) for key, value in metrics.items() if "top1" in key}


def main(argv: list[str]) -> dict:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    config = load_config(argv[0], argv[1:])
    torch.manual_seed(config.train.seed)
    objective = build_objective(config.objective.name, config.objective.params, build_encoder(config.model))
    eval_sets = eval_shard_sets(config.eval)
    before = knn(objective, config, eval_sets)
    print("random init", before, flush=True)

    optimizer = build_optimizer(objective, config, world_size=1)
    scheduler = build_scheduler(optimizer, config)
    randomness = RankRandomness(config.train.seed, 0, torch.device("cpu"))
    options = LoaderOptions(config.global_batch(), num_workers=0, resampled=config.data.resampled,
                            shuffle_buffer=config.data.shuffle_buffer)
    batches = infinite_batches(resolve_shards(config.data.shards), objective.inputs(config.model, config.data),
                               options, seed=config.train.seed)
    steps, start = config.train.steps, time.perf_counter()
    for step in range(steps):
        ctx = StepContext(step, steps, 0, 1, seed=config.train.seed, generator=randomness.generator)
        out = objective(next(batches), ctx)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if config.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), config.optim.clip_grad)
        optimizer.step()
        scheduler.step()
        objective.after_optimizer_step(ctx)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            metrics = {key: round(float(value), 4) for key, value in out.metrics.items()}
            print(f"step {step + 1}/{steps} loss {out.loss.item():.4f} {metrics} "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    after = knn(objective, config, eval_sets)
    print("trained", after, flush=True)
    return {"benchmark": "probe", "config": argv[0], "overrides": argv[1:], "steps": steps,
            "random_init": before, "trained": after, "seconds": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
