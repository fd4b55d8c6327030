"""MSN: Masked Siamese Networks for Label-Efficient Learning (Assran et al. 2022; facebookresearch/msn).

Each image gives one unmasked *target* view and several *anchor* views: ``random_views`` crops at the model's
size with a random share ``mask_ratio`` of their patches dropped, and ``focal_views`` small crops (the paper's
focal masking), unmasked. Every view gets the reference's augmentation (RandomResizedCrop, optional flip, colour
jitter, greyscale, Gaussian blur). The anchors go through the encoder and a projector (CLS token ->
``MLPHead``); the target through an EMA copy of both. Both are softly assigned to learnable L2-normalised
prototypes, ``log_softmax(cos(z, P) / temperature)``; the target assignment is sharpened (``sharpen_temperature``)
and balanced by Sinkhorn-Knopp, and every anchor predicts its image's target by cross-entropy. The mean-entropy
maximisation (ME-MAX) term ``log K - H(mean anchor prediction)`` keeps the prototypes in use. Evaluation and export
use the target encoder (the reference's ``logistic_eval.py`` loads ``target_encoder``).

Each loss step is a pure function with validated arguments: :func:`prototype_log_probs`, :func:`sharpen`,
:func:`sinkhorn`, :func:`soft_cross_entropy`, :func:`global_mean_prediction`, :func:`me_max`.

Decisions vs the reference code (spec ``objectives.md`` section 6, section 11 item 6):

- **Per-sample masks.** The reference drops the same patches in every image of a batch (one ``randperm`` per
  forward); here every sample and every random anchor view draws its own mask (``MaskSpec("random")`` with a
  noise name per view), from the rank's step generator. The batch-shared permutation is a shortcut of the
  reference, not a claim of the paper ("a random mask is applied to the anchor view"), and per-sample masks give
  more distinct masks per step at the same cost.
- **Log-space numerics.** The reference sharpens with ``p ** (1 / T)`` and computes the cross-entropy as
  ``log(p ** -q)``, which underflow / overflow to nan / inf in low precision (``p ** -q`` is inf for a
  probability that underflowed to 0). Here the loss runs in fp32 (the reference casts to float too) on
  log-probabilities: sharpening is ``softmax(log p / T)`` and the cross-entropy ``-(q * log p).sum()``, equal to
  the reference wherever the latter is finite.
- **Across ranks.** Sinkhorn's total and per-prototype sums and the ME-MAX mean prediction are over all ranks
  (the reference's ``all_reduce`` and ``AllReduce``); the mean prediction is gathered with gradients, so with
  DeepSpeed's gradient averaging the parameters get the one-process gradient of the global loss. The reference
  *sums* the prototypes' gradients over ranks (they sit outside DDP) while DDP averages the encoder's; here all
  gradients are averaged, the one-process gradient (under AdamW a constant gradient scale barely matters).
- **Target batch norm.** The target network's batch norms run in train mode (``EMATeacher(batch_stats=True)``): its
  projector's batch norm normalises with the target batch's global statistics, as the reference's target
  encoder (never put in eval mode, SyncBatchNorm across GPUs). The EMA covers parameters only, as in the
  reference. Anchor projections are batch-normalised per crop size (all random anchors together, all focal
  anchors together), as the reference's forward over crop groups does.
- **Schedules.** The momentum is linear from ``momentum`` to ``momentum_end`` over ``momentum_span`` times the
  run's steps (the reference: 0.996 -> 1 over 1.25x, so it ends at 0.9992), a pure function of the optimizer
  step. The sharpening temperature is constant (the released config's start and final values are equal). The
  reference's weight-decay schedule (cosine 0.04 -> 0.4) and learning-rate warm-up from 2e-4 are not modelled:
  the engine's constant weight decay and warm-up from 0 are used. The mean anchor-entropy term, computed with
  weight 0 in the released config, is left out.
- **Prototypes** are an ``(K, proj_dim)`` parameter initialised U(-1/sqrt(d), 1/sqrt(d)) without weight decay
  and at the encoder's learning rate, as the reference.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from maskray.context import StepContext
from maskray.data import ImageTransform, MultiCrop, Photometric, Views
from maskray.distributed import all_gather_with_grad, all_reduce_sum, world_size
from maskray.errors import ConfigError
from maskray.models import MaskedViT, MLPHead
from maskray.objective import Objective, ObjectiveOutput, ObjectiveParams, ParamGroupSpec, register_objective
from maskray.passes import EncoderPass, MaskSpec, PassOutput
from maskray.schedules import linear_schedule
from maskray.teachers import EMATeacher


# -- the loss steps --------------------------------------------------------------------------------------------------
def _check_matrix(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, K) matrix, got shape {tuple(x.shape)}")


def prototype_log_probs(z: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft assignment to prototypes: z (N, D), prototypes (K, D) -> log_softmax(cos(z, P) / temperature) (N, K),
    in fp32 (the reference's ``snn`` with one-hot prototype labels, in log space)."""
    _check_matrix("z", z)
    _check_matrix("prototypes", prototypes)
    if z.shape[1] != prototypes.shape[1]:
        raise ValueError(f"z has {z.shape[1]} features, the prototypes {prototypes.shape[1]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    cosine = F.normalize(z.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).T
    return F.log_softmax(cosine / temperature, dim=1)


def sharpen(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p ** (1/T) / sum(p ** (1/T))`` computed as ``softmax(log p / T)``: log_probs (N, K) -> probs (N, K), fp32.
    ``T = 1`` returns ``p``; smaller ``T`` lowers the entropy. Finite for any finite or -inf log-probability."""
    _check_matrix("log_probs", log_probs)
    if not temperature > 0:
        raise ValueError(f"sharpening temperature must be > 0, got {temperature}")
    return F.softmax(log_probs.float() / temperature, dim=1)


@torch.no_grad()
def sinkhorn(probs: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp balancing of assignments over the global batch: probs (B, K) per rank -> (B, K), fp32.

    As the reference's ``distributed_sinkhorn``: Q = probs / (sum over all ranks); ``iterations`` times, scale each
    prototype's total (summed over all ranks' rows) to 1/K, then each row to 1/B_global; finally rows x B_global,
    so every row sums to 1 and, after the last iteration's row step, each prototype's total approaches
    B_global / K. ``iterations`` >= 1; ``B`` must be the same on every rank.
    """
    _check_matrix("probs", probs)
    if iterations < 1:
        raise ValueError(f"sinkhorn needs iterations >= 1, got {iterations}")
    if bool((probs < 0).any()):
        raise ValueError("sinkhorn needs non-negative assignments")
    q = probs.float().clone()
    rows, prototypes = q.shape[0] * world_size(), q.shape[1]
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=0, keepdim=True)) * prototypes
        q /= q.sum(dim=1, keepdim=True) * rows
    return q * rows


def soft_cross_entropy(targets: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_k q_k log p_k``: targets (N, K) probabilities, log_probs (N, K) -> scalar."""
    _check_matrix("targets", targets)
    if targets.shape != log_probs.shape:
        raise ValueError(f"targets {tuple(targets.shape)} and log_probs {tuple(log_probs.shape)} differ in shape")
    return -(targets * log_probs).sum(dim=1).mean()


def global_mean_prediction(probs: torch.Tensor) -> torch.Tensor:
    """The mean of probs (N, K) over the rows of every rank -> (K,), differentiable (``N`` equal on every rank):
    each rank's gradient is that of the global mean, so gradients averaged over ranks equal one process's."""
    _check_matrix("probs", probs)
    return all_gather_with_grad(probs.mean(dim=0, keepdim=True)).mean(dim=0)


def me_max(mean_probs: torch.Tensor) -> torch.Tensor:
    """The ME-MAX regulariser ``sum_k p_k log p_k + log K = log K - H(p)`` of a mean prediction (K,): 0 for the
    uniform distribution, ``log K`` for a one-hot one (the reference's ``rloss``)."""
    if mean_probs.dim() != 1 or mean_probs.numel() == 0:
        raise ValueError(f"mean_probs must be a non-empty (K,) vector, got shape {tuple(mean_probs.shape)}")
    return torch.xlogy(mean_probs, mean_probs).sum() + math.log(mean_probs.numel())


# -- the objective ---------------------------------------------------------------------------------------------------
class ProjectedEncoder(nn.Module):
    """images (B, C, H, W) -> projector(encoder(images).cls) (B, proj_dim): the network the EMA target copies."""

    def __init__(self, encoder: MaskedViT, projector: MLPHead) -> None:
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(images).cls)


class MSNParams(ObjectiveParams):
    random_views: int = Field(1, ge=1, description="masked anchor crops at the model's image size")
    focal_views: int = Field(2, ge=0, description="small unmasked anchor crops (reference: 10)")
    focal_size: int = Field(12, gt=0, description="focal crop size in pixels, a multiple of the patch size")
    random_crop_scale: tuple[float, float] = Field((0.3, 1.0), description="RandomResizedCrop scale, target+random")
    focal_crop_scale: tuple[float, float] = Field((0.2, 0.5), description="focal crops' scale (reference 0.05-0.3)")
    color_jitter: tuple[float, float, float, float] = Field(
        (0.4, 0.4, 0.4, 0.1), description="ColorJitter (brightness, contrast, saturation, hue); reference: strength "
        "s = 0.5 -> (0.8s, 0.8s, 0.8s, 0.2s)")
    jitter_prob: float = Field(0.8, ge=0.0, le=1.0)
    grayscale_prob: float = Field(0.2, ge=0.0, le=1.0)
    blur_prob: float = Field(0.5, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="Gaussian blur sigma range in pixels")
    mask_ratio: float = Field(0.15, ge=0.0, lt=1.0, description="share of patches dropped from random anchors")
    num_prototypes: int = Field(256, gt=1, description="K (reference: 1024)")
    proj_hidden: int = Field(512, gt=0, description="projector hidden width (reference: 2048)")
    proj_dim: int = Field(64, gt=0, description="projector output / prototype width (reference: 256)")
    temperature: float = Field(0.1, gt=0.0, description="cosine-similarity temperature tau")
    sharpen_temperature: float = Field(0.25, gt=0.0, le=1.0, description="target sharpening T")
    sinkhorn_iterations: int = Field(3, ge=0, description="0 disables Sinkhorn")
    me_max_weight: float = Field(1.0, ge=0.0)
    momentum: float = Field(0.996, ge=0.0, le=1.0, description="EMA momentum at step 0")
    momentum_end: float = Field(1.0, ge=0.0, le=1.0)
    momentum_span: float = Field(1.25, gt=0.0, description="the momentum reaches momentum_end after span x steps")

    @field_validator("random_crop_scale", "focal_crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] <= value[1] <= 1.0:
            raise ValueError("a crop scale must satisfy 0 < low <= high <= 1")
        return value

    @field_validator("color_jitter")
    @classmethod
    def _jitter_range(cls, value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if min(value) < 0 or value[3] > 0.5:
            raise ValueError("color_jitter is (brightness, contrast, saturation, hue), each >= 0, hue <= 0.5")
        return value

    @field_validator("blur_sigma")
    @classmethod
    def _sigma_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] <= value[1]:
            raise ValueError("blur_sigma must satisfy 0 < low <= high")
        return value


@register_objective("msn")
class MSN(Objective):
    Config = MSNParams

    def __init__(self, encoder: MaskedViT, params: MSNParams) -> None:
        super().__init__(encoder, params)
        self.projector = MLPHead((encoder.embed_dim, params.proj_hidden, params.proj_hidden, params.proj_dim),
                                 activation="gelu")
        bound = params.proj_dim**-0.5
        self.prototypes = nn.Parameter(torch.empty(params.num_prototypes, params.proj_dim).uniform_(-bound, bound))
        momentum = partial(_momentum, start=params.momentum, end=params.momentum_end, span=params.momentum_span)
        self.target = EMATeacher(ProjectedEncoder(encoder, self.projector), momentum, batch_stats=True)

    def check(self, model, data, where: str) -> None:
        if self.params.focal_views and self.params.focal_size % model.patch_size:
            raise ConfigError(f"key '{where}.focal_size': {self.params.focal_size} is not a multiple of "
                              f"model.patch_size {model.patch_size}")

    # -- views and passes ------------------------------------------------------------------------------------------
    def inputs(self, model, data) -> Views:
        """``views``: [target, random anchors..., focal anchors...], (C, S, S) each, S the model's or focal size."""
        p = self.params
        photometric = Photometric(jitter=p.jitter_prob, jitter_strength=p.color_jitter, grayscale=p.grayscale_prob,
                                  blur=p.blur_prob, blur_sigma=p.blur_sigma)
        common = dict(train=True, hflip=data.hflip, mean=data.mean, std=data.std, in_chans=model.in_chans,
                      photometric=photometric)
        random = ImageTransform(model.img_size, crop_scale=p.random_crop_scale, **common)
        focal = ImageTransform(p.focal_size, crop_scale=p.focal_crop_scale, **common)
        return Views(views=MultiCrop((random,) * (1 + p.random_views) + (focal,) * p.focal_views))

    def passes(self) -> dict[str, EncoderPass]:
        p = self.params
        passes = {}
        for i in range(p.random_views):  # one noise name per view: independent per-sample masks
            mask = MaskSpec("random", ratio=p.mask_ratio, noise=f"msn.anchor{i}") if p.mask_ratio > 0 else None
            passes[f"random{i}"] = EncoderPass(f"views.{1 + i}", mask)
        for j in range(p.focal_views):
            passes[f"focal{j}"] = EncoderPass(f"views.{1 + p.random_views + j}")
        return passes

    # -- the loss --------------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        """batch["views"]: [target (B, C, S, S), anchors...]; outputs: the anchors' passes (B, 1+K_i, D)."""
        p = self.params
        groups = [[f"random{i}" for i in range(p.random_views)], [f"focal{j}" for j in range(p.focal_views)]]
        anchors = torch.cat([self.projector(torch.cat([outputs[name].out.cls for name in group]))
                             for group in groups if group])  # (V*B, proj_dim), view-major
        anchor_log_probs = prototype_log_probs(anchors, self.prototypes, p.temperature)
        with torch.no_grad():
            target = self.target(batch["views"][0])  # (B, proj_dim)
            targets = sharpen(prototype_log_probs(target, self.prototypes, p.temperature), p.sharpen_temperature)
            if p.sinkhorn_iterations:
                targets = sinkhorn(targets, p.sinkhorn_iterations)
        views = anchors.shape[0] // targets.shape[0]
        ce = soft_cross_entropy(targets.repeat(views, 1), anchor_log_probs)
        regulariser = me_max(global_mean_prediction(anchor_log_probs.exp()))
        with torch.no_grad():
            metrics = {
                "ce": ce.detach(),
                "me_max": regulariser.detach(),
                "target_prototypes": targets.new_tensor(float(targets.argmax(dim=1).unique().numel())),
                "target_max": targets.max(dim=1).values.mean(),
            }
        return ObjectiveOutput(loss=ce + p.me_max_weight * regulariser, metrics=metrics)

    # -- state and optimizer ---------------------------------------------------------------------------------------
    def eval_encoder(self) -> nn.Module:
        return self.target.module.encoder

    def param_group_specs(self) -> list[ParamGroupSpec]:
        return [ParamGroupSpec("prototypes", weight_decay=0.0)]


def _momentum(step: int, total_steps: int, start: float, end: float, span: float) -> float:
    """Linear ``start`` -> ``end`` over ``span * total_steps`` optimizer steps (MSN: 0.996 -> 1 over 1.25x)."""
    return linear_schedule(step, max(1, int(span * total_steps)), start, end)
