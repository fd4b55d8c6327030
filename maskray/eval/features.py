"""Frozen-feature extraction from labelled shard sets."""

from __future__ import annotations

import torch

from maskray.data import ImageTransform, ShardSet, Views, build_loader
from maskray.models import MaskedViT

FEATURES = ("cls", "mean")


@torch.no_grad()
def extract_features(
    encoder: MaskedViT,
    shards: ShardSet,
    transform: ImageTransform,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run the encoder (eval mode, no masking) over every sample once, each image through ``transform``.

    Returns ``({"cls": (N, D), "mean": (N, D)}, labels (N,))``: the CLS token after the final norm and the
    mean of the normalised patch tokens.
    """
    was_training = encoder.training
    encoder.eval()
    loader = build_loader(shards, Views(image=transform), batch_size=batch_size, num_workers=0, drop_last=False)
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    labels = []
    for batch in loader:
        out = encoder(batch["image"].to(device))
        feats["cls"].append(out.cls.float().cpu())
        feats["mean"].append(out.patches.float().mean(dim=1).cpu())
        labels.append(batch["label"])
    encoder.train(was_training)
    return {name: torch.cat(parts) for name, parts in feats.items()}, torch.cat(labels)
