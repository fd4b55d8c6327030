"""Do frames close in time score closer than frames far apart? The temporal check of a ToBo (or any) encoder on clips.

    python benchmarks/pair_distance.py --run-id ID --tracking-uri URI --clips DIR [--small 1 2] [--large 16 31]
        [--triplets 512] [--seed 0] [--log-figure]

For ``--triplets`` random (clip, anchor frame t) draws from the clip shards in ``--clips`` (each clip long enough
for the largest gap), a *near* frame ``t + g`` with g uniform in ``--small`` and a *far* frame ``t + G`` with G
uniform in ``--large`` (inclusive ranges) are embedded with the run's eval transform (resize, center crop,
normalise). Reported per feature (``cls``: the CLS token, ``mean``: mean-pooled patch tokens) and per encoder
(the run's final checkpoint, the same architecture at random init with the run's seed, raw pixels), on features
centred by their mean over all embedded frames: the mean cosine similarity of near pairs and of far pairs, and
``closer``: the share of triplets whose near pair is more similar than its far pair (0.5 = no temporal signal).
``--log-figure`` also logs the run's loss curves (``loss`` and every ``loss_*`` part) as
``pair_distance/loss_curves.png`` to the run. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from maskray.checkpoint import load_encoder
from maskray.data import ImageTransform, build_loader, resolve_shards
from maskray.eval.features import pooled_features
from maskray.eval.runner import resolve_target
from maskray.models import build_encoder


def sample_triplets(lengths: list[int], small: tuple[int, int], large: tuple[int, int], count: int,
                    rng: np.random.Generator) -> np.ndarray:
    """(count, 4) int rows (clip, anchor t, near t + g, far t + G): g uniform in ``small``, G in ``large`` (inclusive),
    clips drawn uniformly among those with more than ``large[1]`` frames, t uniform in [0, T - 1 - large[1]]."""
    if not 1 <= small[0] <= small[1] < large[0] <= large[1]:
        raise ValueError(f"need 1 <= small gaps {small} < large gaps {large}")
    eligible = np.flatnonzero(np.asarray(lengths) > large[1])
    if len(eligible) == 0:
        raise ValueError(f"no clip has more than {large[1]} frames (longest: {max(lengths)})")
    clips = rng.choice(eligible, size=count)
    anchors = np.array([rng.integers(0, lengths[c] - large[1]) for c in clips])
    near = anchors + rng.integers(small[0], small[1] + 1, size=count)
    far = anchors + rng.integers(large[0], large[1] + 1, size=count)
    return np.stack([clips, anchors, near, far], axis=1)


def closer_share(anchor: torch.Tensor, near: torch.Tensor, far: torch.Tensor) -> dict[str, float]:
    """Mean cosine similarity of (anchor, near) and (anchor, far) rows (N, D), and the share of rows whose near
    similarity is larger."""
    sim_near = F.cosine_similarity(anchor, near, dim=1)
    sim_far = F.cosine_similarity(anchor, far, dim=1)
    return {"sim_near": sim_near.mean().item(), "sim_far": sim_far.mean().item(),
            "closer": (sim_near > sim_far).float().mean().item()}


def centered(*features: torch.Tensor) -> list[torch.Tensor]:
    """The feature sets (N, D) minus their joint mean row: cosine similarities then measure how frames differ, not
    the component every frame of a (static-camera) video shares."""
    mean = torch.cat(features).mean(dim=0, keepdim=True)
    return [feature - mean for feature in features]


def _clips(directory: str) -> list[np.ndarray]:
    def frames(sample):
        return {"frames": torch.from_numpy(sample.frames())}

    loader = build_loader(resolve_shards(directory, "--clips"), frames, batch_size=1, num_workers=0, drop_last=False)
    return [batch["frames"][0].numpy() for batch in loader]


@torch.no_grad()
def _features(encoder, images: torch.Tensor) -> dict[str, torch.Tensor]:
    encoder.eval()
    parts = [pooled_features(encoder(chunk)) for chunk in images.split(256)]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _log_loss_figure(uri: str, run_id: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    names = sorted(k for k in client.get_run(run_id).data.metrics if k == "loss" or k.startswith("loss_"))
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name in names:
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        axis.plot([m.step for m in history], [m.value for m in history], label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("norm-pix MSE on removed target patches")
    axis.legend()
    figure.tight_layout()
    client.log_figure(run_id, figure, "pair_distance/loss_curves.png")
    plt.close(figure)
    return "pair_distance/loss_curves.png"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", required=True, help="MLflow run of a pretraining run")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--clips", required=True, help="clip shards (launch/make_shards.py --clips)")
    parser.add_argument("--small", type=int, nargs=2, default=(1, 2), metavar=("MIN", "MAX"), help="near gaps")
    parser.add_argument("--large", type=int, nargs=2, default=(16, 31), metavar=("MIN", "MAX"), help="far gaps")
    parser.add_argument("--triplets", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-figure", action="store_true", help="log the run's loss curves to the run")
    args = parser.parse_args()

    target = resolve_target(args.tracking_uri, args.run_id, create_run=False)
    trained, config = load_encoder(target.checkpoint)
    torch.manual_seed(config.train.seed)  # the random-init arm: the run's architecture and seed, as its k-NN
    random_init = build_encoder(config.model)
    transform = ImageTransform.for_eval(config.model, config.data)
    clips = _clips(args.clips)
    triplets = sample_triplets([len(c) for c in clips], tuple(args.small), tuple(args.large), args.triplets,
                               np.random.default_rng(args.seed))

    def frame(clip: int, t: int) -> torch.Tensor:
        pixels = clips[clip][t]
        return transform(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))

    images = [torch.stack([frame(row[0], row[column]) for row in triplets]) for column in (1, 2, 3)]
    results: dict[str, dict[str, float]] = {}
    raw = [image.flatten(1) for image in images]
    results["pixels"] = closer_share(*centered(*raw))
    for arm, encoder in (("pretrained", trained), ("random_init", random_init)):
        features = [_features(encoder, image) for image in images]
        for name in features[0]:
            results[f"{arm}/{name}"] = closer_share(*centered(*(f[name] for f in features)))
    print(f"{len(triplets)} triplets from {len(clips)} clips of {args.clips}: near gaps {args.small}, far gaps "
          f"{args.large} (run {target.run_id}, step {target.step})")
    for key, value in results.items():
        print(f"  {key:22s} near {value['sim_near']:.4f}  far {value['sim_far']:.4f}  closer {value['closer']:.3f}")
    out = {"benchmark": "pair_distance", "run_id": target.run_id, "step": target.step, "clips": args.clips,
           "small": list(args.small), "large": list(args.large), "triplets": len(triplets), "results": results}
    if args.log_figure:
        out["figure"] = _log_loss_figure(target.tracking_uri, target.run_id)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
