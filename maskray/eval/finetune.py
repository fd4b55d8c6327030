"""End-to-end fine-tuning of a pretrained encoder: MAE's recipe (``main_finetune.py``, ``util/lr_decay.py``) scaled
down to a CPU.

Model: a copy of the encoder (the caller's encoder and checkpoint are never modified) rebuilt with stochastic depth
``drop_path``, then global average pooling of the patch tokens of the last block, the encoder's final norm as
``fc_norm`` (MAE creates a fresh LayerNorm there; reusing the pretrained one keeps its statistics) and a
``Linear(D, C)`` head with trunc_normal(std=2e-5) weights and a zero bias (MAE's manual head init).

Optimiser: AdamW (betas 0.9, 0.999), ``lr = blr * batch / 256``, **layer-wise lr decay**: with ``L = depth + 1``,
block ``i`` (0-based) gets ``layer_decay ** (L - i - 1)``, ``cls_token`` / ``pos_embed`` / ``patch_embed`` get the
smallest scale ``layer_decay ** L``, the final norm and the head get 1. Weight decay 0.05, except for biases, norm
weights (ndim <= 1), ``cls_token`` and ``pos_embed``. Linear warmup then half-cycle cosine to 0, set every
iteration. Loss: cross-entropy with label smoothing 0.1.

Augmentation: the caller's train transform (RandomResizedCrop and optional flip, the run's mean/std). Left out
from MAE's recipe: mixup 0.8, cutmix 1.0, RandAugment (rand-m9-mstd0.5-inc1) and RandErase 0.25 (they need far
more epochs than a CPU evaluation affords), and the exponential-moving-average / best-epoch selection (the last
epoch is reported).

The training images are decoded once and kept in memory; every random draw (head init, drop path, crops, batch
order, the ``labels_per_class`` subset) is made under a forked torch RNG seeded with ``seed``, so the result is
deterministic for a seed on a given device.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from maskray.data import DecodedSample, ShardSet, Views, build_loader
from maskray.models import MaskedViT
from maskray.schedules import warmup_cosine

Transform = Callable[[Image.Image | DecodedSample], torch.Tensor]  # an ImageTransform
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_EMBEDDING = ("cls_token", "pos_embed", "reg_token", "patch_embed.")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning hyperparameters: MAE ViT-B's (layer decay 0.65, wd 0.05, drop path 0.1, label smoothing 0.1)
    with a CPU-sized schedule. ``blr`` is larger than MAE's 5e-4 because the schedule is 15 epochs, not 100.
    ``labels_per_class``: fine-tune on that many images per class only (drawn with ``seed``), None: all."""

    epochs: int = 15
    warmup_epochs: int = 2
    batch_size: int = 64
    blr: float = 1e-3
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    labels_per_class: int | None = None
    seed: int = 0


class FinetuneClassifier(nn.Module):
    """A copy of ``encoder`` with drop path ``drop_path``, average pooling, fc_norm and a linear head."""

    def __init__(self, encoder: MaskedViT, num_classes: int, drop_path: float) -> None:
        super().__init__()
        self.encoder = MaskedViT(encoder.cfg.model_copy(update={"drop_path_rate": drop_path}))
        self.encoder.vit.load_state_dict(encoder.vit.state_dict(), strict=True)
        self.encoder.to(encoder.vit.cls_token.device)
        self.head = nn.Linear(encoder.embed_dim, num_classes, device=encoder.vit.cls_token.device)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) -> logits (B, num_classes)."""
        last = self.encoder.depth - 1
        tokens = self.encoder(images, return_layers=(last,)).layers[last]  # (B, 1+L, D) before the final norm
        return self.head(self.encoder.vit.norm(tokens[:, 1:].mean(dim=1)))


def layer_id(name: str, num_layers: int) -> int:
    """MAE's ``get_layer_id_for_vit`` for a parameter name of the timm ViT (``blocks.3.attn.qkv.weight``):
    0 for the embeddings, ``i + 1`` for block ``i``, ``num_layers`` (depth + 1) for the rest."""
    if name.startswith(_EMBEDDING):
        return 0
    match = _BLOCK.match(name)
    return int(match.group(1)) + 1 if match else num_layers


def param_groups(model: FinetuneClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with ``lr_scale = layer_decay ** (num_layers - layer_id)`` and weight decay
    ``weight_decay`` (0 for ndim <= 1 and the encoder's ``no_weight_decay`` names). Frozen parameters are left
    out."""
    num_layers = model.encoder.depth + 1
    no_decay = model.encoder.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    named = [(f"vit.{n}", p) for n, p in model.encoder.vit.named_parameters()]
    named += [(f"head.{n}", p) for n, p in model.head.named_parameters()]
    for full_name, param in named:
        if not param.requires_grad:
            continue
        name = full_name.split(".", 1)[1] if full_name.startswith("vit.") else full_name
        layer = layer_id(name, num_layers)
        decay = param.ndim > 1 and full_name not in no_decay
        group = groups.setdefault((layer, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers - layer),
        })
        group["params"].append(param)
        group["names"].append(full_name)
    return [groups[key] for key in sorted(groups)]


def load_images(shards: ShardSet) -> tuple[list[Image.Image], torch.Tensor]:
    """Decode every sample once: RGB PIL images (any size) and labels (N,)."""
    def keep(sample: DecodedSample) -> dict[str, torch.Tensor]:
        return {"image": pil_to_tensor(sample.image().convert("RGB"))}  # (3, H, W) uint8

    loader = build_loader(shards, keep, batch_size=1, num_workers=0, drop_last=False)
    images, labels = [], []
    for batch in loader:
        images.append(to_pil_image(batch["image"][0]))
        labels.append(batch["label"])
    return images, torch.cat(labels)


def few_labels(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (sorted) of ``per_class`` samples drawn at random from each class of labels (N,)."""
    chosen = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


@torch.no_grad()
def accuracy(model: nn.Module, shards: ShardSet, transform: Transform, batch_size: int,
             device: torch.device | str) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of a classifier over every sample of ``shards``."""
    model.eval()
    correct, count = [], 0
    for batch in build_loader(shards, Views(image=transform), batch_size=batch_size, num_workers=0, drop_last=False):
        logits = model(batch["image"].to(device))  # (B, C)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        correct.append(top == batch["label"].unsqueeze(1))
        count += len(batch["label"])
    hits = torch.cat(correct)
    return {"top1": 100.0 * hits[:, 0].sum().item() / count, "top5": 100.0 * hits.any(dim=1).sum().item() / count}


def finetune(
    encoder: MaskedViT,
    shard_sets: tuple[ShardSet, ShardSet],
    num_classes: int,
    train_transform: Transform,
    eval_transform: Transform,
    config: FinetuneConfig = FinetuneConfig(),
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Fine-tune a copy of ``encoder`` on ``shard_sets[0]``; top-1 / top-5 (percent) on ``shard_sets[1]``."""
    images, labels = load_images(shard_sets[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        subset = torch.arange(len(labels))
        if config.labels_per_class is not None:
            subset = few_labels(labels, config.labels_per_class, generator)
        model = FinetuneClassifier(encoder, num_classes, config.drop_path)
        batch = min(config.batch_size, len(subset))
        iters_per_epoch = len(subset) // batch
        base_lr = config.blr * batch / 256
        groups = param_groups(model, config.weight_decay, config.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=(0.9, 0.999))
        total, warmup = config.epochs * iters_per_epoch, config.warmup_epochs * iters_per_epoch

        model.train()
        step = 0
        for _ in range(config.epochs):
            order = subset[torch.randperm(len(subset), generator=generator)]
            for index in order[: iters_per_epoch * batch].view(iters_per_epoch, batch).tolist():
                lr = warmup_cosine(step, base_lr, total, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                inputs = torch.stack([train_transform(images[i]) for i in index]).to(device)  # (B, C, H, W)
                loss = F.cross_entropy(model(inputs), labels[index].to(device), label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    return accuracy(model, shard_sets[1], eval_transform, 256, device)

