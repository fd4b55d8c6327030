"""DTM: Masked Image Modeling via Dynamic Token Morphing (Kim, Heo, Han; ICLR 2025 "Morphing Tokens Draw Strong
Masked Image Models"; naver-ai/dtm). Spec ``objectives.md`` section 4 and appendix A.3.

A frozen teacher's patch features are the targets. The student sees the image with a block-wise mask (masked
patches replaced by the encoder's mask token) and a linear head maps every final-norm patch token to the teacher's
width. Instead of token-by-token regression, each step draws a morphing schedule and groups contextually similar
*teacher* tokens by iterated ToMe bipartite soft matching; student predictions and teacher targets are both
replaced by their group means (the same projector ``P`` for both, no gradient through the matching) and compared
with smooth-L1 (beta 2) over all tokens, averaged over ``levels`` independent morphings.

Pure functions, each tested (``tests/test_dtm.py``): :func:`draw_schedule` (the per-step draw), :func:`merge_round`
(one ToMe round), :func:`morph_groups` (the token groups S of iterated rounds), :func:`group_projector`
(``P = S^T diag(1/|g|) S``), :func:`morph` (group means), :func:`smooth_l1`, :func:`dtm_loss`.

Decisions vs the reference code (spec section 11, items 4 and 5):

- The schedule comes from ``ctx.step_generator("dtm")`` (seeded by seed, step, rank), not Python's ``random``
  seeded once per rank, so a resumed run draws what it would have drawn; every micro-batch of an optimizer step
  shares the step's draw. As in the reference, ranks draw their own schedules and all images of a rank's batch share
  it. Per level: ``n ~ U{0..max_merges}``, ``k ~ U{1..max_iterations}``, ``r = ceil(n / k)`` unless
  ``ceil(n / k) * k > max_merges``, then ``floor(n / k)``. The reference bounds this rule with level 1's ``n1`` for
  both levels; with one ``max_merges`` for all levels (the reference default ``n1 = n2``) that quirk cannot differ.
- Patch 0 is merged like any other (``protect_first: false``): the reference calls ToMe with ``class_token=True``
  on CLS-less patch tokens, so the top-left patch is never merged, an accident rather than a design (``true``
  reproduces it). Unmerged A tokens are always put back in image order (ToMe does so with ``class_token=True``,
  i.e. always in DTM), so later rounds alternate A/B over neighbouring positions.
- The teacher gets the batch re-normalised into its own statistics (``teacher.mean`` / ``teacher.std``: CLIP's
  for OpenCLIP weights, the run's data statistics for a maskray teacher); the reference feeds CLIP the
  ImageNet-normalised tensor.
- The teacher is any frozen-teacher source (:mod:`maskray.teacher_sources`), by default not CLIP: its weights
  cannot be downloaded here. The head's width follows the teacher's feature width.
- Gradient accumulation is the engine's (the reference zeroes the gradients before the last micro-batch and does
  not divide the loss); no ``vocab_size`` factory bug to carry over; the loss is on all tokens, visible and masked,
  as the reference computes it (item 5); the optional ``normalize_target`` and the alternative distances of the
  reference (L1, L2, neg-cosine, torch's SmoothL1) are not offered: smooth-L1 beta 2 is its default.
- The student's initialisation is maskray's encoder init (not BEiT's rescaled trunc-normal).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from maskray.context import StepContext
from maskray.data.transforms import ImageTransform, Photometric, channel_stats
from maskray.data.views import BlockMask, Views
from maskray.errors import ConfigError
from maskray.models import MaskedViT
from maskray.objective import Objective, ObjectiveOutput, ObjectiveParams, register_objective
from maskray.passes import EncoderPass, MaskSpec, PassOutput
from maskray.teacher_sources import TeacherSpec, build_teacher, renormalize

Schedule = list[tuple[int, int, int]]  # per level: (merges drawn n, iterations k, tokens merged per iteration r)


class DTMParams(ObjectiveParams):
    teacher: TeacherSpec = Field(description="the frozen teacher whose patch features are the targets")
    mask_ratio: float = Field(75 / 196, ge=0.0, lt=1.0,
                              description="share of patches block-masked: round(ratio * L) (reference: 75 of 196)")
    min_block: int = Field(5, gt=0, description="smallest mask block in patches (reference: 16 on 14x14)")
    levels: int = Field(2, gt=0, description="independent morphings per step, losses averaged (reference: 2)")
    max_merges: int | None = Field(None, ge=0, description="n ~ U{0..max_merges} per level; null: the patch count "
                                   "L (reference: 196 = L)")
    max_iterations: int = Field(8, gt=0, description="matching rounds k ~ U{1..max_iterations} (reference: 14)")
    protect_first: bool = Field(False, description="never merge patch 0, the reference's class_token quirk")
    beta: float = Field(2.0, gt=0.0, description="smooth-L1 change point (reference: 2)")
    color_jitter: float = Field(0.0, ge=0.0, description="ColorJitter brightness/contrast/saturation strength, "
                                "always applied (reference: 0.4; 0: off)")


def draw_schedule(generator: torch.Generator, levels: int, max_merges: int, max_iterations: int) -> Schedule:
    """Per level ``(n, k, r)``: ``n ~ U{0..max_merges}``, ``k ~ U{1..max_iterations}`` and the tokens merged per
    round ``r = ceil(n / k)``, or ``floor(n / k)`` when ``ceil(n / k) * k`` would exceed ``max_merges``."""
    if max_merges < 0 or max_iterations < 1:
        raise ValueError(f"max_merges must be >= 0 and max_iterations >= 1, got {max_merges}, {max_iterations}")
    schedule = []
    for _ in range(levels):
        n = int(torch.randint(0, max_merges + 1, (1,), generator=generator))
        k = int(torch.randint(1, max_iterations + 1, (1,), generator=generator))
        r = math.ceil(n / k) if math.ceil(n / k) * k <= max_merges else n // k
        schedule.append((n, k, r))
    return schedule


def merge_round(
    x: torch.Tensor, size: torch.Tensor, source: torch.Tensor, r: int, protect_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe bipartite soft-matching round on the current tokens.

    x: (B, t, D) current (merged) tokens; size: (B, t, 1) original tokens per current token; source: (B, t, N)
    {0, 1}, row = current token, column = original token. Tokens at even positions (A) are matched to their most
    cosine-similar odd one (B); the ``r' = min(r, (t - protect_first) // 2)`` best-matched A tokens merge into their
    match (size-weighted mean). Returns the new ``(x, size, source)`` with ``t - r'`` tokens ordered
    [unmerged A in their previous order, all of B].
    """
    t = x.shape[1]
    r = min(r, (t - int(protect_first)) // 2)
    if r <= 0:
        return x, size, source
    a, b = F.normalize(x[:, ::2], dim=-1), F.normalize(x[:, 1::2], dim=-1)
    scores = a @ b.transpose(1, 2)  # (B, ceil(t/2), floor(t/2))
    if protect_first:
        scores[:, 0, :] = -math.inf
    best, match = scores.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True, stable=True).unsqueeze(-1)  # (B, ta, 1)
    merged, kept = ranked[:, :r], ranked[:, r:].sort(dim=1).values
    target = match.unsqueeze(-1).gather(1, merged)  # (B, r, 1): the B token each merged A token joins

    def fold(y: torch.Tensor, reduce: str) -> torch.Tensor:
        ya, yb = y[:, ::2], y[:, 1::2]
        width = y.shape[-1]
        yb = yb.scatter_reduce(1, target.expand(-1, -1, width), ya.gather(1, merged.expand(-1, -1, width)),
                               reduce=reduce)
        return torch.cat([ya.gather(1, kept.expand(-1, -1, width)), yb], dim=1)

    new_size = fold(size, "sum")
    return fold(x * size, "sum") / new_size, new_size, fold(source, "amax")


@torch.no_grad()
def morph_groups(features: torch.Tensor, rounds: int, r: int, protect_first: bool = False) -> torch.Tensor:
    """features: (B, N, D) teacher tokens -> groups S (B, G, N) in {0, 1} after ``rounds`` merge rounds of ``r``
    tokens each (:func:`merge_round`, starting from every token alone; ``r = 0``: S = I). Every original token is
    in exactly one group (each column of S sums to 1)."""
    batch, length, _ = features.shape
    source = torch.eye(length, device=features.device).expand(batch, length, length)
    if r > 0:
        x, size = features.detach().float(), torch.ones(batch, length, 1, device=features.device)
        for _ in range(rounds):
            x, size, source = merge_round(x, size, source, r, protect_first)
    return source


def group_projector(groups: torch.Tensor) -> torch.Tensor:
    """groups S (B, G, N) -> P (B, N, N) = S^T diag(1 / (|g| + 1e-6)) S: ``P @ y`` replaces each token of ``y`` by
    its group's mean. P is symmetric, row-stochastic and idempotent (up to the 1e-6); trace(P) = G."""
    return groups.transpose(1, 2) @ (groups / (groups.sum(-1, keepdim=True) + 1e-6))


def morph(tokens: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D), projector (B, N, N) -> (B, N, D): every token replaced by its group's mean."""
    return projector @ tokens


def smooth_l1(diff: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Element-wise ``0.5 d^2 / beta`` for ``|d| < beta``, else ``|d| - 0.5 beta`` (convex, as L1 and L2)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    absolute = diff.abs()
    return torch.where(absolute < beta, 0.5 * absolute**2 / beta, absolute - 0.5 * beta)


def dtm_loss(
    predictions: torch.Tensor, targets: torch.Tensor, projectors: list[torch.Tensor], beta: float = 2.0
) -> torch.Tensor:
    """predictions / targets (B, N, D), one projector (B, N, N) per level -> the mean over levels of the mean
    smooth-L1 over (B, N, D) between the morphed predictions and the morphed targets."""
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ")
    if not projectors:
        raise ValueError("dtm_loss needs at least one projector")
    losses = [smooth_l1(morph(predictions, p) - morph(targets, p), beta).mean() for p in projectors]
    return torch.stack(losses).mean()


@register_objective("dtm")
class DTM(Objective):
    Config = DTMParams

    def __init__(self, encoder: MaskedViT, params: DTMParams) -> None:
        super().__init__(encoder, params)
        img_size = encoder.cfg.img_size
        self.teacher = build_teacher(params.teacher, img_size=img_size)
        encoder.add_mask_token()
        self.head = nn.Linear(encoder.embed_dim, self.teacher.module.embed_dim)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.student_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def check(self, model, data, where: str) -> None:
        grid, student = tuple(self.teacher.module.grid_size), tuple(self.encoder.grid_size)
        if grid != student:
            raise ConfigError(f"key '{where}.teacher.img_size': the teacher's {grid[0]}x{grid[1]} patch grid at "
                              f"{self.params.teacher.img_size or model.img_size} px differs from the student's "
                              f"{student[0]}x{student[1]}")
        if len(self.teacher.mean) != self.encoder.in_chans:
            raise ConfigError(f"key '{where}.teacher.mean': the teacher takes {len(self.teacher.mean)} channels, "
                              f"the student {self.encoder.in_chans}")

    @property
    def num_masked(self) -> int:
        return round(self.params.mask_ratio * self.encoder.num_patches)

    def inputs(self, model, data) -> Views:
        """One training crop (the run's normalisation, optional colour jitter) and its block mask ``mask`` (L,).
        Records the run's ``data.mean`` / ``data.std``: the teacher's input is re-normalised from them."""
        self.student_stats = channel_stats(data.mean, data.std, model.in_chans)
        jitter = self.params.color_jitter
        photometric = Photometric(jitter=1.0 if jitter else 0.0, jitter_strength=(jitter, jitter, jitter, 0.0),
                                  grayscale=0.0, blur=0.0)
        image = ImageTransform(model.img_size, train=True, crop_scale=data.crop_scale, hflip=data.hflip,
                               mean=data.mean, std=data.std, in_chans=model.in_chans, photometric=photometric)
        mask = BlockMask(tuple(self.encoder.grid_size), self.num_masked, min_block=self.params.min_block)
        return Views(image=image, mask=mask)

    def passes(self) -> dict[str, EncoderPass]:
        return {"masked": EncoderPass("image", MaskSpec("batch", mode="replace", key="mask"))}

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's patch features (B, L, D_t) of the student's batch, re-normalised into its statistics."""
        if self.student_stats is None:
            raise RuntimeError("DTM.inputs() sets the run's normalisation; call it before computing targets")
        mean, std = self.student_stats
        return self.teacher(renormalize(images, mean, std, self.teacher.mean, self.teacher.std)).float()

    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        """batch["image"]: (B, C, H, W); outputs["masked"]: the encoder with masked patches replaced (B, 1+L, D)."""
        masked = outputs["masked"]
        predictions = self.head(masked.out.patches).float()  # (B, L, D_t), every patch
        targets = self.targets(batch["image"])
        length = predictions.shape[1]
        p = self.params
        schedule = draw_schedule(ctx.step_generator("dtm"), p.levels, length if p.max_merges is None else
                                 p.max_merges, p.max_iterations)
        projectors = [group_projector(morph_groups(targets, k, r, p.protect_first)) for _, k, r in schedule]
        loss = dtm_loss(predictions, targets, projectors, p.beta)
        with torch.no_grad():  # trace(P) = the number of groups; the loss without morphing (>= the morphed one)
            groups = torch.stack([proj.diagonal(dim1=1, dim2=2).sum(-1).mean() for proj in projectors]).mean()
            token_loss = smooth_l1(predictions - targets, p.beta).mean()
        return ObjectiveOutput(loss=loss, metrics={"groups": groups, "token_loss": token_loss,
                                                   "mask_ratio": masked.mask.mean().detach()})
