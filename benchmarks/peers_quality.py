"""Does maskray's MAE learn as well as the peers'? The same MAE pretraining budget on the bundled demo data, then the
same k-NN evaluation, for maskray, Hugging Face ViTMAE and lightly (``benchmarks/peers.py``).

    python benchmarks/peers_quality.py [--seeds 0 1 2] [--steps 400] [--batch 64] [--libraries ...]
        [--shards data/demo] [--out runs/bench-peers-quality] [--table-only]

Every library: the demo architecture (``configs/demo/mae.yaml``: ViT-Tiny width, 4 blocks, 16x16 images of 4x4
patches, decoder 2 x 128), one process, the same stream of augmented batches (maskray's WebDataset loader with
the MAE objective's input transform, seeded by the seed), the same AdamW (lr 1.5e-3 x batch / 256, betas 0.9 /
0.95, weight decay 0.05) and warmup-cosine schedule (100 warmup steps), ``--steps`` optimizer steps of ``--batch``
images, fp32. Then each encoder's weights go into a maskray ``MaskedViT`` of the same architecture (HF's through
maskray's ViTMAE converter, lightly's timm ViT as it is: the same forward, ``benchmarks/peers_step.py`` checks
the loss) and maskray's evaluator runs the demo k-NN (DINO protocol, k 20, T 0.07, mean-pooled features) on the
899 test digits against the 898 train ones. Images/s: training steps only (the loader excluded). Each (library,
seed) writes ``<out>/<library>-seed<seed>.json``; the table covers every JSON in ``<out>`` (mean and spread
over seeds), so seeds can run in separate invocations. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402

from maskray.config import project_root  # noqa: E402
from maskray.data import LoaderOptions, infinite_batches, resolve_shards  # noqa: E402
from maskray.eval.protocol import encoder_knn_metrics, eval_shard_sets  # noqa: E402
from maskray.models import build_encoder  # noqa: E402
from maskray.models.pretrained import hf_vitmae_checkpoint_filter_fn  # noqa: E402


def as_maskray_encoder(library: str, encoder: torch.nn.Module, config):
    """The trained encoder's weights in a maskray ``MaskedViT`` of the same architecture (fp32)."""
    ours = build_encoder(config.model)
    if library == "maskray":
        state = encoder.vit.state_dict()
    elif library == "hf":
        state = hf_vitmae_checkpoint_filter_fn({f"vit.{k}": v for k, v in encoder.state_dict().items()})
    else:
        state = encoder.vit.state_dict()
    missing, unexpected = ours.vit.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or any(not key.startswith("head") for key in missing):
        raise RuntimeError(f"{library} -> MaskedViT: missing {missing}, unexpected {unexpected}")
    return ours.eval()


def run(library: str, seed: int, args: argparse.Namespace) -> dict:
    arch = peers.ARCHS["demo"]
    lr = 1.5e-3 * args.batch / 256
    step = peers.build_step(library, arch, args.batch, "fp32", lr=lr, seed=seed, warmup=args.warmup,
                            steps=args.steps)
    config = peers.maskray_config(arch, args.batch, "fp32", args.steps, lr, (
        f"data.shards={args.shards / 'train'}", f"eval.train_shards={args.shards / 'train'}",
        f"eval.test_shards={args.shards / 'test'}"))
    objective = peers.maskray_objective(arch)
    options = LoaderOptions(args.batch, num_workers=0, resampled=True, shuffle_buffer=config.data.shuffle_buffer)
    batches = infinite_batches(resolve_shards(config.data.shards), objective.inputs(config.model, config.data),
                               options, seed=seed * 1_000_003)
    busy, losses = 0.0, []
    for _ in range(args.steps):
        images = next(batches)["image"]
        start = time.perf_counter()
        losses.append(step(images))
        busy += time.perf_counter() - start
    encoder = as_maskray_encoder(library, step.encoder(), config)
    knn = encoder_knn_metrics(encoder, eval_shard_sets(config.eval), config)
    return {"library": library, "seed": seed, "steps": args.steps, "batch": args.batch,
            "knn_top1": knn["knn_top1"], "images_per_s": args.steps * args.batch / busy,
            "first_loss": losses[0], "final_loss": statistics.fmean(losses[-10:])}


def table(out: Path) -> list[dict]:
    results: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*-seed*.json")):
        row = json.loads(path.read_text())
        results.setdefault(row["library"], []).append(row)
    rows = []
    print("| library | seeds | k-NN top-1 % (mean ± sd) | per seed | train images/s (mean) | final loss |")
    print("|---|---|---|---|---|---|")
    for library in peers.LIBRARIES:
        if library not in results:
            continue
        runs = sorted(results[library], key=lambda r: r["seed"])
        knn = [r["knn_top1"] for r in runs]
        spread = statistics.stdev(knn) if len(knn) > 1 else 0.0
        speed = statistics.fmean(r["images_per_s"] for r in runs)
        loss = statistics.fmean(r["final_loss"] for r in runs)
        rows.append({"library": library, "seeds": [r["seed"] for r in runs], "knn_top1_mean": statistics.fmean(knn),
                     "knn_top1_sd": spread, "knn_top1": knn, "images_per_s": speed, "final_loss": loss,
                     "steps": runs[0]["steps"], "batch": runs[0]["batch"]})
        print(f"| {library} | {len(runs)} | {statistics.fmean(knn):.2f} ± {spread:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in knn)} | {speed:.0f} | {loss:.4f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (the demo: 800)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (the demo: 128 over 2 workers)")
    parser.add_argument("--warmup", type=int, default=100, help="warmup steps")
    parser.add_argument("--libraries", nargs="+", default=list(peers.LIBRARIES), choices=peers.LIBRARIES)
    parser.add_argument("--shards", type=Path, default=project_root() / "data" / "demo",
                        help="demo shards (train/ and test/; python launch/make_shards.py demo data/demo)")
    parser.add_argument("--out", type=Path, default=project_root() / "runs" / "bench-peers-quality")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    args.shards = args.shards.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for seed in args.seeds:
            for library in args.libraries:
                result = run(library, seed, args)
                (args.out / f"{library}-seed{seed}.json").write_text(json.dumps(result))
                print(f"{library} seed {seed}: k-NN {result['knn_top1']:.2f} %, {result['images_per_s']:.0f} img/s, "
                      f"final loss {result['final_loss']:.4f}", flush=True)
    rows = table(args.out)
    print(json.dumps({"benchmark": "peers_quality", "host": platform.node(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
