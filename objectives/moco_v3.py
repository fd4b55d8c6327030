"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers (Chen, Xie, He 2021).

Two augmented views of each image (the BYOL-style asymmetric recipe: blur always on view 1, rarely on view 2,
solarisation only on view 2) run unmasked through the encoder; a 3-layer projector and a 2-layer predictor map the
pooled token to queries ``q``; the momentum encoder (an EMA of encoder + projector) maps the other view to keys
``k``. The loss is the symmetric InfoNCE ``2T * CE(q1 k2^T / T) + 2T * CE(q2 k1^T / T)`` with the keys of every
rank all-gathered (no gradient) and each query's positive at its global index (spec ``objectives.md`` 8.1, A.8).

Decisions vs the reference (facebookresearch/moco-v3, spec section 11):

- Momentum update: the reference updates the momentum encoder inside ``forward`` with ``m(i)`` before the keys of
  iteration i; here the core updates it after optimizer step i with ``m(i)`` (a pure function of the optimizer
  step, so gradient accumulation and resume are exact). The first update is a no-op in the reference (both
  encoders start equal), so this is the same sequence shifted by one step. Schedule: cosine ``momentum`` -> 1 over
  the run (``adjust_moco_momentum``, per step instead of per fractional epoch).
- The momentum encoder's batch norms use the statistics of its batch (the reference runs it in train mode), via
  ``EMATeacher(batch_stats=True)``; its parameters are averaged, not its buffers, as in the reference. BatchNorm
  is :class:`~maskray.models.GlobalBatchNorm1d` (the reference's SyncBatchNorm on any backend).
- ``freeze_patch_embed`` (on, the reference's ``--stop-grad-conv1``): the patch projection keeps its random init
  (xavier-uniform of the flattened kernel, which is the reference's ``uniform(+-sqrt(6 / (3 p^2 + D)))`` for
  RGB) and is left out of the optimizer; the EMA keeps the teacher's copy equal to it. The reference's ViT
  additionally uses a fixed 2-D sin-cos position embedding, as maskray's ``pos_embed: sincos`` default.
- Weight decay: the reference decays every parameter (``AdamW(model.parameters())``); maskray's optimizer skips
  biases, norms, the CLS token and position embedding (timm / MAE convention), for every objective alike.
- ``pool``: the reference projects the CLS token; ``mean`` (mean of the normalised patch tokens) is offered for
  small-data runs where the k-NN protocol reads mean-pooled features.
- Horizontal flips follow ``data.hflip`` (the reference always flips; flipping digits changes what they show).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from maskray.context import StepContext
from maskray.data import ImageTransform, MultiCrop, Photometric, Views
from maskray.distributed import all_gather_with_grad, rank
from maskray.models import EncoderOutput, MaskedViT, MLPHead
from maskray.objective import Objective, ObjectiveOutput, ObjectiveParams, register_objective
from maskray.passes import EncoderPass, PassOutput
from maskray.schedules import cosine_schedule
from maskray.teachers import EMATeacher

Pair = tuple[float, float]


class MoCoV3Params(ObjectiveParams):
    temperature: float = Field(0.2, gt=0.0, description="InfoNCE temperature T")
    momentum: float = Field(0.99, ge=0.0, le=1.0, description="EMA momentum at step 0, cosine to 1 at the end")
    mlp_dim: int = Field(1024, gt=0, description="hidden width of projector and predictor (reference 4096)")
    out_dim: int = Field(256, gt=0, description="output width of projector and predictor")
    freeze_patch_embed: bool = Field(True, description="keep the patch projection at its random init")
    pool: Literal["cls", "mean"] = Field("cls", description="token the projector reads: CLS or mean of patches")
    crop_scale: Pair = Field((0.08, 1.0), description="RandomResizedCrop scale of both views")
    jitter: float = Field(0.8, ge=0.0, le=1.0, description="probability of colour jitter")
    jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale: float = Field(0.2, ge=0.0, le=1.0, description="probability of greyscale conversion")
    blur: Pair = Field((1.0, 0.1), description="Gaussian blur probability of view 1 / view 2")
    blur_sigma: Pair = Field((0.1, 2.0), description="blur sigma range in pixels")
    solarize: Pair = Field((0.0, 0.2), description="solarisation probability of view 1 / view 2")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, value: Pair) -> Pair:
        if not 0.0 < value[0] <= value[1] <= 1.0:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        return value

    @field_validator("blur", "solarize")
    @classmethod
    def _probabilities(cls, value: Pair) -> Pair:
        if not all(0.0 <= p <= 1.0 for p in value):
            raise ValueError("each view's probability must be in [0, 1]")
        return value

    @field_validator("blur_sigma")
    @classmethod
    def _sigma_range(cls, value: Pair) -> Pair:
        if not 0.0 < value[0] <= value[1]:
            raise ValueError("blur_sigma must satisfy 0 < low <= high")
        return value


def pooled(out: EncoderOutput, pool: str) -> torch.Tensor:
    """(B, 1+n, D) encoder output -> (B, D): the CLS token or the mean of the patch tokens."""
    return out.cls if pool == "cls" else out.patches.mean(dim=1)


class ProjectedEncoder(nn.Module):
    """encoder + projector: images (B, C, H, W) -> (B, out_dim), the branch the momentum encoder averages."""

    def __init__(self, encoder: MaskedViT, projector: MLPHead, pool: str) -> None:
        super().__init__()
        self.encoder, self.projector, self.pool = encoder, projector, pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(pooled(self.encoder(images), self.pool))


def moco_contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's ``ctr_loss``: ``2T * CE(normalize(q) @ normalize(K)^T / T, rank * B + arange(B))``.

    q: (B, d) this rank's queries (with gradient); k: (B, d) this rank's keys of the other view (no gradient is
    taken); K: the keys of every rank, all-gathered, rank r's at rows ``[r*B, (r+1)*B)``. Computed in fp32 at least.
    Returns a scalar: the mean over this rank's queries (the mean over ranks is the one-process loss).
    """
    if q.dim() != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must be (B, d) of one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(q.dtype, torch.float32)
    q = F.normalize(q.to(dtype), dim=1)
    with torch.no_grad():
        keys = all_gather_with_grad(F.normalize(k.detach().to(dtype), dim=1))  # (world * B, d)
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


@register_objective("moco_v3")
class MoCoV3(Objective):
    Config = MoCoV3Params

    def __init__(self, encoder: MaskedViT, params: MoCoV3Params) -> None:
        super().__init__(encoder, params)
        if params.freeze_patch_embed:
            encoder.vit.patch_embed.proj.requires_grad_(False)
        self.projector = MLPHead((encoder.embed_dim, params.mlp_dim, params.mlp_dim, params.out_dim),
                                 last_norm="plain")
        self.predictor = MLPHead((params.out_dim, params.mlp_dim, params.out_dim), last_norm="plain")
        momentum = partial(cosine_schedule, start=params.momentum, end=1.0)
        self.momentum_encoder = EMATeacher(ProjectedEncoder(encoder, self.projector, params.pool), momentum,
                                           batch_stats=True)

    def inputs(self, model, data) -> Views:
        """``moco_views``: the two augmented crops (C, S, S) of each image."""
        p = self.params
        crops = tuple(
            ImageTransform(model.img_size, train=True, crop_scale=p.crop_scale, hflip=data.hflip, mean=data.mean,
                           std=data.std, in_chans=model.in_chans,
                           photometric=Photometric(jitter=p.jitter, jitter_strength=p.jitter_strength,
                                                   grayscale=p.grayscale, blur=blur, blur_sigma=p.blur_sigma,
                                                   solarize=solarize))
            for blur, solarize in zip(p.blur, p.solarize, strict=True)
        )
        return Views(moco_views=MultiCrop(crops))

    def passes(self) -> dict[str, EncoderPass]:
        return {"view1": EncoderPass("moco_views.0"), "view2": EncoderPass("moco_views.1")}

    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        """batch["moco_views"]: two (B, C, H, W) crops; outputs view1 / view2: the encoder on each, unmasked."""
        pool, temperature = self.params.pool, self.params.temperature
        q1, q2 = (self.predictor(self.projector(pooled(outputs[name].out, pool))) for name in ("view1", "view2"))
        k1, k2 = (self.momentum_encoder(view) for view in batch["moco_views"])
        loss12 = moco_contrastive_loss(q1, k2, temperature)
        loss21 = moco_contrastive_loss(q2, k1, temperature)
        return ObjectiveOutput(loss=loss12 + loss21, metrics={"loss_12": loss12.detach(), "loss_21": loss21.detach()})
