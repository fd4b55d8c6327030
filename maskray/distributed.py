"""Collectives that losses and teachers need across ranks, as core helpers (no objective writes its own).

All of them work without an initialised process group (one process: identity), so objectives run the same
code in unit tests and on a cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _AllGather(torch.autograd.Function):
    """Concatenate ``x`` of every rank along dim 0; the backward sums the gradients of all ranks and returns
    this rank's slice, so a loss over the gathered batch gets the gradient it would get in one process."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = rank() * ctx.batch
        return grad[start : start + ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """x: (B, ...) on every rank (same B) -> (world_size * B, ...), rank r's rows at ``[r*B, (r+1)*B)``.

    Differentiable: when each rank computes a loss over its own rows against the gathered batch, the gradient
    that reaches rank r's rows is the sum over all ranks' losses, so after DeepSpeed averages gradients over
    ranks the parameters get the single-process gradient of the mean of the ranks' losses.
    """
    if world_size() == 1:
        return x
    return _AllGather.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (a new tensor, no gradient), e.g. batch statistics of a centering or
    Sinkhorn step."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x)
        x /= world_size()
    return x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks (a new tensor, no gradient), e.g. codebook usage counts."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``x`` on every rank (a new tensor, no gradient), e.g. a random draw that must be identical on
    all ranks (codebook initialisation and restarts)."""
    x = x.detach().clone().contiguous()
    if world_size() > 1:
        dist.broadcast(x, src)
    return x


def is_partitioned(params: Iterable[nn.Parameter]) -> bool:
    """Whether any of ``params`` is a DeepSpeed ZeRO-3 partitioned parameter."""
    return any(hasattr(param, "ds_id") for param in params)


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Read full values of ``params`` inside the block. Under ZeRO-3 this gathers the partitioned parameters (a
    collective: every rank must enter it); otherwise it does nothing."""
    params = list(params)
    if not is_partitioned(params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
