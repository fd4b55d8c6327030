"""The core collectives across two real processes (gloo on 127.0.0.1): a loss over each rank's rows against the
all-gathered batch, with gradients averaged over ranks as DeepSpeed does, equals the one-process loss and
gradient on the whole batch; all-reduce helpers average and sum; a head with global batch norm trains like
one process on the whole batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from helpers import spawn_two

from maskray.distributed import all_gather_with_grad, all_reduce_mean, all_reduce_sum
from maskray.models.heads import MLPHead

BATCH, DIM = 6, 5


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2 * BATCH, DIM, generator=generator), torch.randn(DIM, DIM, generator=generator)


def _loss(queries: torch.Tensor, keys: torch.Tensor, offset: int) -> torch.Tensor:
    """InfoNCE of each query row against all keys, the positive being the key with the same global index."""
    logits = queries @ keys.T / 0.2
    targets = torch.arange(queries.shape[0]) + offset
    return torch.nn.functional.cross_entropy(logits, targets)


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x, weight = _inputs()
    weight = weight.clone().requires_grad_(True)
    local = x[rank * BATCH : (rank + 1) * BATCH] @ weight
    loss = _loss(local, all_gather_with_grad(local), rank * BATCH)
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    results[rank] = {
        "loss": all_reduce_mean(loss).item(),
        "grad": grad / 2,
        "sum": all_reduce_sum(torch.tensor([float(rank + 1)])).item(),
    }
    dist.destroy_process_group()


def test_gathered_loss_and_gradient_equal_one_process_on_the_whole_batch() -> None:
    results = spawn_two(_worker)

    x, weight = _inputs()
    weight.requires_grad_(True)
    embedded = x @ weight
    loss = _loss(embedded, embedded, 0)
    loss.backward()
    for rank in (0, 1):
        assert abs(results[rank]["loss"] - loss.item()) < 1e-6
        torch.testing.assert_close(results[rank]["grad"], weight.grad, rtol=1e-5, atol=1e-7)
        assert results[rank]["sum"] == 3.0


def _head() -> MLPHead:
    """In float64: the gradient of a layer before batch norm is a small difference of large terms."""
    torch.manual_seed(0)
    return MLPHead((DIM, 7, 3), last_norm="affine").double()


def _head_loss(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.arange(1.0, 4.0, dtype=torch.float64)).pow(2).mean()


def _head_worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x, _ = _inputs()
    head = _head()
    out = head(x[rank * BATCH : (rank + 1) * BATCH].double())
    _head_loss(out).backward()
    grads = [p.grad.clone() for p in head.parameters()]
    for grad in grads:
        dist.all_reduce(grad)
    results[rank] = {"out": out.detach(), "grads": [g / 2 for g in grads],
                     "running": [b.clone() for b in head.buffers()]}
    dist.destroy_process_group()


def test_global_batch_norm_head_equals_one_process_on_the_whole_batch() -> None:
    results = spawn_two(_head_worker)
    x, _ = _inputs()
    head = _head()
    out = head(x.double())
    _head_loss(out).backward()
    for rank in (0, 1):
        torch.testing.assert_close(results[rank]["out"], out[rank * BATCH : (rank + 1) * BATCH].detach(),
                                   rtol=1e-9, atol=1e-10)
        for got, want in zip(results[rank]["grads"], head.parameters(), strict=True):
            torch.testing.assert_close(got, want.grad, rtol=1e-9, atol=1e-10)
        for got, want in zip(results[rank]["running"], head.buffers(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
