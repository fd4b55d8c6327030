"""MAE + LUT: Learning with Unmasked Tokens Drives Stronger Vision Learners (Kim et al., ECCV 2024; naver-ai/lut).

MAE (``objectives/mae.py``, reused unchanged: its pass, decoder and loss on view 1) plus a "broader context"
(BC) loss on the encoded *unmasked* tokens (spec ``objectives.md`` section 3, appendix A.2):

- two views of each image: ``image`` (view 1, the one MAE reconstructs: the run's training crop) and
  ``augmented`` (view 2: the same kind of crop, drawn independently, plus colour augmentation);
- one noise draw per image serves both views: view 1 keeps the noise ranks ``[0, K)`` (MAE's mask), view 2 the
  next ``[K, 2K)``, so their visible sets are disjoint (``MaskSpec(..., chunk=1)`` on MAE's noise); this needs
  ``2K <= L``, i.e. ``mask_ratio >= 0.5``;
- student, each view: ``s_v = predictor(projector(mean of the visible patch tokens after the final norm))``
  (CLS excluded), the projector and predictor each ``Linear(D, H, no bias) - BN - ReLU - Linear(H, D)``
  (:class:`~maskray.models.MLPHead`; BN = :class:`~maskray.models.heads.GlobalBatchNorm1d`, the global-batch
  statistics of the reference's SyncBatchNorm), run on each view separately (per-view BN batches, as the
  reference calls the heads once per view);
- teacher: an EMA of the whole student (encoder, decoder, projector, predictor: the reference's ``ModelEma`` of
  the full model), parameters *and* buffers (BN running statistics), momentum cosine ``momentum -> 1``. It runs in
  eval mode (BN on its EMA'd running statistics) on each *whole* view, no masking:
  ``t_v = projector_T(mean of all patch tokens)``, no predictor, no gradient;
- ``L_BC = (d(s_2, t_1) + d(s_1, t_2)) / 2`` over the batch, ``d(a, b) = 2 - 2 cos(a, b)`` (cross-view pairs
  only; the teacher side is the target); ``L = L_MAE + bc_weight * L_BC``.

Decisions on the reference's discrepancies (spec section 11) and other deviations, and why:

- ``--w_b`` vs ``args.w_bc`` (11.1): the released argparse default (0.1, under the wrong name) is unreachable;
  ``bc_weight`` defaults to 0.25, the documented recommended command (``--w_bc 0.25``); MAE's weight is 1.
- EMA index (11.2): the reference indexes its momentum schedule by the data-loader iteration while updating once
  per optimizer step (every ``accum_iter`` iterations). Here the momentum is a pure function of the optimizer
  step, ``cosine(step, train.steps, momentum, 1)``, applied after each optimizer step: the same curve (up to a
  shift of ``accum_iter - 1`` iterations out of epochs x iterations), and exact under resume and accumulation.
- sqrt LR scaling (11.3): maskray's rule is linear (``lr = blr * B / 256``); at the recipe's global batch 4096 both
  give 2.4e-3 (``configs/paper/mae_lut.yaml``). For another batch with the reference's rule set ``optim.lr`` to
  ``blr * sqrt(B) / 4``.
- The heads' last Linear has a bias here (``MLPHead`` without a last norm), none in the reference.
- View 2's colour augmentation: the reference applies ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, then exactly
  one of {grayscale, solarize, Gaussian blur} chosen uniformly; :class:`~maskray.data.transforms.Photometric`
  draws each independently, so the defaults give each probability 1/3 (one on average, as many as the
  reference in expectation). Both views use the run's RandomResizedCrop (``data.crop_scale``, ``data.hflip``)
  where the reference resizes and random-crops with 4-pixel reflect padding.
- Evaluation and export use the student encoder, as the reference fine-tunes its ``model`` weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from maskray.context import StepContext
from maskray.data.transforms import ImageTransform, Photometric
from maskray.data.views import Views
from maskray.models import MaskedViT, MLPHead
from maskray.objective import ObjectiveOutput, register_objective
from maskray.passes import EncoderPass, PassOutput
from maskray.schedules import cosine_schedule
from maskray.teachers import EMATeacher
from objectives.mae import MAE, MAEParams


class MAELUTParams(MAEParams):
    mask_ratio: float = Field(0.75, ge=0.5, lt=1.0,
                              description="share of patches removed from each view; >= 0.5 so that the two views' "
                              "visible sets are disjoint")
    bc_weight: float = Field(0.25, ge=0.0, description="weight of the cross-view BC loss (MAE's weight is 1)")
    head_dim: int = Field(1024, gt=0, description="hidden width of the projector and predictor")
    momentum: float = Field(0.996, ge=0.0, le=1.0, description="EMA momentum at step 0 (cosine to 1)")
    jitter: float = Field(0.8, ge=0.0, le=1.0, description="view 2: ColorJitter(0.4, 0.4, 0.2, 0.1) probability")
    grayscale: float = Field(1 / 3, ge=0.0, le=1.0, description="view 2: greyscale probability")
    blur: float = Field(1 / 3, ge=0.0, le=1.0, description="view 2: Gaussian blur (sigma 0.1..2) probability")
    solarize: float = Field(1 / 3, ge=0.0, le=1.0, description="view 2: solarisation probability")


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BYOL's ``2 - 2 cos(a, b)`` per row: a, b (B, D) -> (B,), in [0, 4]."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"cosine_distance takes two (B, D) tensors of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return 2 - 2 * (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(dim=-1)


def cross_view_loss(students: tuple[torch.Tensor, torch.Tensor], targets: tuple[torch.Tensor, torch.Tensor]
                    ) -> torch.Tensor:
    """LUT's BC loss: each view's student prediction against the *other* view's target, averaged over the
    batch and the two pairs: ``(mean d(s_2, t_1) + mean d(s_1, t_2)) / 2``. students, targets: two (B, D) each."""
    (s1, s2), (t1, t2) = students, targets
    return (cosine_distance(s2, t1).mean() + cosine_distance(s1, t2).mean()) / 2


class LUTStudent(nn.Module):
    """The modules the EMA teacher follows: the encoder, MAE decoder, projector and predictor (shared with the
    objective, not registered on it). ``forward`` is the teacher's target: images (B, C, H, W), all patches
    -> projector(mean of the patch tokens) (B, D)."""

    def __init__(self, encoder: MaskedViT, decoder: nn.Module, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.encoder, self.decoder, self.projector, self.predictor = encoder, decoder, projector, predictor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(images).patches.mean(dim=1))


@register_objective("mae_lut")
class MAELUT(MAE):
    Config = MAELUTParams

    def __init__(self, encoder: MaskedViT, params: MAELUTParams) -> None:
        super().__init__(encoder, params)
        width = encoder.embed_dim
        self.projector = MLPHead((width, params.head_dim, width))
        self.predictor = MLPHead((width, params.head_dim, width))
        student = LUTStudent(self.encoder, self.decoder, self.projector, self.predictor)
        self.teacher = EMATeacher(student, functools.partial(cosine_schedule, start=params.momentum, end=1.0),
                                  include_buffers=True)

    def inputs(self, model, data) -> Views:
        crop = ImageTransform.for_training(model, data)
        photometric = Photometric(jitter=self.params.jitter, grayscale=self.params.grayscale,
                                  blur=self.params.blur, solarize=self.params.solarize)
        augmented = ImageTransform(model.img_size, train=True, crop_scale=data.crop_scale, hflip=data.hflip,
                                   mean=data.mean, std=data.std, in_chans=model.in_chans, photometric=photometric)
        return Views(image=crop, augmented=augmented)

    def passes(self) -> dict[str, EncoderPass]:
        """MAE's pass on view 1 and view 2 with the next block of the same noise's ranks (disjoint visible sets)."""
        passes = super().passes()
        first = passes["visible"].mask
        return {**passes, "augmented": EncoderPass("augmented", dataclasses.replace(first, chunk=first.chunk + 1))}

    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        """batch["image"], batch["augmented"]: (B, C, H, W); outputs: each view's visible patches (B, 1+K, D)."""
        mae = super().loss(batch, outputs, ctx)
        students = tuple(self.predictor(self.projector(outputs[name].out.patches.mean(dim=1)))
                         for name in ("visible", "augmented"))
        targets = tuple(self.teacher(batch[name]).to(students[0].dtype) for name in ("image", "augmented"))
        bc = cross_view_loss(students, targets)
        normalised = F.normalize(targets[0].float(), dim=-1)
        return ObjectiveOutput(loss=mae.loss + self.params.bc_weight * bc, metrics={
            **mae.metrics, "mae_loss": mae.loss.detach(), "bc_loss": bc.detach(),
            "target_std": normalised.std(dim=0).mean(),  # collapse watch: 0 when every target is the same
        })
