"""The torch optimizer DeepSpeed steps: AdamW, with per-group gradient clipping when an objective asks for it."""

from __future__ import annotations

import torch
import torch.distributed as dist


class GroupClippedAdamW(torch.optim.AdamW):
    """AdamW that first scales the gradients of every group with a ``max_grad_norm`` so that the group's norm is
    at most that value (``torch.nn.utils.clip_grad_norm_`` per group).

    ``partitioned``: the optimizer holds only this rank's shard of each group (ZeRO 1-3), so the squared norms are
    summed over ranks (every rank steps the same groups in the same order, so the collectives match).
    """

    def __init__(self, params, partitioned: bool = False, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.partitioned = partitioned

    @torch.no_grad()
    def clip_groups(self) -> None:
        for group in self.param_groups:
            limit = group.get("max_grad_norm")
            if limit is None or not group["params"]:
                continue
            grads = [p.grad for p in group["params"] if p.grad is not None]
            device = group["params"][0].device
            squared = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=device))
            if self.partitioned and dist.is_initialized():
                dist.all_reduce(squared)
            scale = (limit / (squared.sqrt() + 1e-6)).clamp(max=1.0)
            for grad in grads:
                grad.mul_(scale.to(grad.dtype))

    def step(self, closure=None):
        self.clip_groups()
        return super().step(closure)
