"""Frozen-feature extraction from labelled shard sets."""

from __future__ import annotations

import torch

from maskray.data import ImageTransform, ShardSet, Views, build_loader
from maskray.models import EncoderOutput, MaskedViT

FEATURES = ("cls", "mean")


def pooled_features(out: EncoderOutput) -> dict[str, torch.Tensor]:
    """``{"cls": (B, D), "mean": (B, D)}`` float32: the CLS token after the final norm and the mean of the
    normalised patch tokens of an unmasked encoder output."""
    return {"cls": out.cls.float(), "mean": out.patches.float().mean(dim=1)}


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
        for name, values in pooled_features(encoder(batch["image"].to(device))).items():
            feats[name].append(values.cpu())
        labels.append(batch["label"])
    encoder.train(was_training)
    return {name: torch.cat(parts) for name, parts in feats.items()}, torch.cat(labels)
