"""Projection / prediction heads of the siamese objectives (MoCo v3, MSN, LUT) and the batch norm they need.

:class:`GlobalBatchNorm1d` normalises with the statistics of the *global* batch (all ranks), as the references
get from ``nn.SyncBatchNorm``, which torch only runs on accelerators; this one works on any backend (gloo on
CPU included) and is a plain ``BatchNorm1d`` in one process. :class:`MLPHead` is the Linear-BN-activation
stack that all of those heads are made of.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn

from maskray.distributed import all_gather_with_grad, world_size

LastNorm = Literal["none", "affine", "plain"]


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the batch of every rank: x (B, C) -> (B, C).

    In training with a process group of more than one rank, the per-channel sums and sums of squares of each
    rank's rows are all-gathered (with gradients, :func:`~maskray.distributed.all_gather_with_grad`), so the
    output and the gradient of each row equal one-process batch norm over the concatenated batch. Running
    statistics use the global unbiased variance, as ``nn.BatchNorm1d`` does. Otherwise (eval, one rank) it is
    ``nn.BatchNorm1d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Statistics and normalisation in at least fp32, the running buffers' dtype, whatever ``x``'s (DeepSpeed's
        bf16 mode casts the affine parameters, not the buffers); the output has ``x``'s dtype."""
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        weight, bias = (self.weight.to(x.dtype), self.bias.to(x.dtype)) if self.affine else (None, None)
        if not self.training or world_size() == 1:
            return self._local(x, weight, bias).to(dtype)
        if x.dim() != 2:
            raise ValueError(f"GlobalBatchNorm1d takes (B, C) inputs, got shape {tuple(x.shape)}")
        local = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), x.shape[0])])  # (2C + 1,)
        total = all_gather_with_grad(local[None]).sum(0)
        count = total[-1]
        mean = total[: x.shape[1]] / count
        var = (total[x.shape[1] : -1] / count - mean * mean).clamp_min(0.0)  # biased, as batch norm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        return (out * weight + bias if self.affine else out).to(dtype)

    def _local(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """``nn.BatchNorm1d.forward`` with the given fp32 affine parameters."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or self.running_mean is None
        tracked = not self.training or self.track_running_stats
        return nn.functional.batch_norm(x, self.running_mean if tracked else None,
                                        self.running_var if tracked else None, weight, bias, batch_stats,
                                        momentum, self.eps)


class MLPHead(nn.Sequential):
    """An MLP head x (B, dims[0]) -> (B, dims[-1]): for each hidden layer Linear (no bias when normalised) +
    GlobalBatchNorm1d (if ``norm``) + activation; then the last Linear, followed by ``last_norm``: ``"none"``,
    ``"affine"`` (batch norm with scale and shift) or ``"plain"`` (batch norm without them, MoCo v3's
    ``BatchNorm1d(affine=False)``).

    MoCo v3's projector is ``MLPHead((D, 4096, 4096, 256), last_norm="plain")`` and its predictor
    ``MLPHead((256, 4096, 256), last_norm="plain")``; MSN's projector ``MLPHead((D, 2048, 2048, 256),
    activation="gelu")``.
    """

    def __init__(
        self,
        dims: Sequence[int],
        norm: bool = True,
        activation: Literal["relu", "gelu"] = "relu",
        last_norm: LastNorm = "none",
    ) -> None:
        dims = tuple(int(d) for d in dims)
        if len(dims) < 2 or min(dims) < 1:
            raise ValueError(f"MLPHead needs at least two positive dims (in, ..., out), got {dims}")
        if last_norm not in ("none", "affine", "plain"):
            raise ValueError(f"last_norm must be 'none', 'affine' or 'plain', got {last_norm!r}")
        layers: list[nn.Module] = []
        for width_in, width_out in zip(dims[:-2], dims[1:-1], strict=True):
            layers.append(nn.Linear(width_in, width_out, bias=not norm))
            if norm:
                layers.append(GlobalBatchNorm1d(width_out))
            layers.append(nn.ReLU(inplace=True) if activation == "relu" else nn.GELU())
        layers.append(nn.Linear(dims[-2], dims[-1], bias=last_norm == "none"))
        if last_norm != "none":
            layers.append(GlobalBatchNorm1d(dims[-1], affine=last_norm == "affine"))
        super().__init__(*layers)
        self.dims = dims
