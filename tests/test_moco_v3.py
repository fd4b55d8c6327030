"""MoCo v3 without Ray: the contrastive loss at collapse, the momentum encoder's update and batch statistics, the
frozen patch projection, the views, and two gloo processes with all-gathered keys against one process."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maskray.config import load_config
from maskray.context import StepContext
from maskray.errors import ConfigError
from maskray.models import build_encoder
from maskray.objective import build_objective, validate_objective
from maskray.schedules import cosine_schedule
from objectives.moco_v3 import moco_contrastive_loss

BATCH = 4
SMALL = {"mlp_dim": 32, "out_dim": 16}


def _moco(dtype: torch.dtype = torch.float32, **params):
    config = load_config(None, ["model.depth=2"])
    torch.manual_seed(0)
    objective = build_objective("moco_v3", {**SMALL, **params}, build_encoder(config.model)).to(dtype)
    teacher = objective.momentum_encoder
    teacher.module.to(dtype)
    teacher.dtype = dtype
    return objective, config


def _views(dtype: torch.dtype = torch.float32, batch: int = BATCH) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 16, 16, generator=generator).to(dtype) for _ in range(2)]


def _ctx(step: int = 0) -> StepContext:
    return StepContext(step=step, total_steps=10, generator=torch.Generator().manual_seed(0))


def test_loss_at_a_collapsed_representation_is_2T_log_N() -> None:
    q = torch.ones(BATCH, 8, requires_grad=True)
    k = torch.ones(BATCH, 8)
    for temperature in (0.2, 1.0):
        loss = moco_contrastive_loss(q, k, temperature)
        assert loss.item() == pytest.approx(2 * temperature * math.log(BATCH), rel=1e-6)
    loss.backward()
    assert torch.all(q.grad.abs() < 1e-6)  # every key is the positive: no direction to move
    with pytest.raises(ValueError, match="one shape"):
        moco_contrastive_loss(q, k[:2], 0.2)


def test_loss_prefers_the_matching_key() -> None:
    keys = torch.eye(BATCH, 8)
    aligned = moco_contrastive_loss(keys, keys, 0.2)
    shuffled = moco_contrastive_loss(keys, keys.roll(1, dims=0), 0.2)
    assert aligned.item() < 2 * 0.2 * math.log(BATCH) < shuffled.item()


def test_momentum_encoder_follows_encoder_and_projector_after_each_optimizer_step() -> None:
    """The formula itself: test_objective_platform.py::test_ema_teacher_follows_the_formula_and_never_gets_gradients
    (its ``moco_v3`` case)."""
    objective, _ = _moco()
    teacher = objective.momentum_encoder
    names = {id(p) for p in [*objective.encoder.parameters(), *objective.projector.parameters()]}
    assert [id(p) for p in teacher.student.parameters()] == [id(p) for p in objective.encoder.parameters()] + [
        id(p) for p in objective.projector.parameters()]
    assert not {id(p) for p in objective.predictor.parameters()} & names
    optimizer = torch.optim.AdamW([p for g in objective.param_groups(0.1) for p in g["params"]], lr=1e-2)
    objective.train()
    objective({"moco_views": _views()}, _ctx()).loss.backward()
    optimizer.step()
    before = [p.detach().clone() for p in teacher.module.parameters()]
    metrics = objective.after_optimizer_step(_ctx(step=3))
    m = cosine_schedule(3, 10, objective.params.momentum, 1.0)
    assert metrics == {"momentum/momentum_encoder": pytest.approx(m)}
    moved = 0
    for old, new in zip(before, teacher.module.parameters(), strict=True):
        assert new.grad is None
        moved += int(not torch.equal(new, old))
    assert moved > 0


def test_momentum_encoder_normalises_keys_with_batch_statistics() -> None:
    objective, _ = _moco()
    objective.eval()  # the momentum encoder uses its batch's statistics whatever the student's mode
    keys = objective.momentum_encoder(_views(batch=16)[0])
    assert not keys.requires_grad
    torch.testing.assert_close(keys.mean(0), torch.zeros(keys.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(keys.var(0, unbiased=False), torch.ones(keys.shape[1]), atol=1e-2, rtol=0)
    assert not objective.momentum_encoder.module.encoder.training


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_patch_projection_gets_no_gradient_and_stays_put(freeze: bool) -> None:
    objective, _ = _moco(freeze_patch_embed=freeze)
    proj = objective.encoder.vit.patch_embed.proj
    start = proj.weight.detach().clone()
    optimised = {id(p) for g in objective.param_groups(0.1) for p in g["params"]}
    optimizer = torch.optim.AdamW([p for g in objective.param_groups(0.1) for p in g["params"]], lr=1e-2)
    objective.train()
    objective({"moco_views": _views()}, _ctx()).loss.backward()
    optimizer.step()
    objective.after_optimizer_step(_ctx())
    teacher_proj = objective.momentum_encoder.module.encoder.vit.patch_embed.proj
    if freeze:
        assert proj.weight.grad is None and proj.bias.grad is None and id(proj.weight) not in optimised
        assert torch.equal(proj.weight, start) and torch.equal(teacher_proj.weight, start)
    else:
        assert proj.weight.grad is not None and id(proj.weight) in optimised
        assert not torch.equal(proj.weight, start)


def test_views_are_two_crops_with_the_asymmetric_recipe() -> None:
    objective, config = _moco()
    views = objective.inputs(config.model, config.data)
    crops = views.entries["moco_views"].transforms
    assert views.shapes() == {"moco_views": [(3, 16, 16), (3, 16, 16)]}
    assert [(c.photometric.blur, c.photometric.solarize) for c in crops] == [(1.0, 0.0), (0.1, 0.2)]
    with pytest.raises(ConfigError, match="objective.crop_scale"):
        validate_objective("moco_v3", {"crop_scale": [0.5, 0.2]})
    with pytest.raises(ConfigError, match="objective.blur"):
        validate_objective("moco_v3", {"blur": [1.5, 0.1]})


# --- two gloo processes, each with half the batch, against one process on the whole batch --------------------------
def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    objective, _ = _moco(torch.float64)
    objective.train()
    views = [v[rank * BATCH : (rank + 1) * BATCH] for v in _views(torch.float64, 2 * BATCH)]
    loss = objective({"moco_views": views}, _ctx()).loss
    loss.backward()
    grads = {}
    for name, param in objective.named_parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            grads[name] = param.grad / 2
    collapsed = moco_contrastive_loss(torch.ones(BATCH, 4), torch.ones(BATCH, 4), 0.2)
    total = loss.detach().clone()
    dist.all_reduce(total)
    results[rank] = {"loss": total.item() / 2, "grads": grads, "collapsed": collapsed.item()}
    dist.destroy_process_group()


def test_two_ranks_with_gathered_keys_equal_one_process_on_the_whole_batch() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, results), nprocs=2, join=True)

    objective, _ = _moco(torch.float64)
    objective.train()
    loss = objective({"moco_views": _views(torch.float64, 2 * BATCH)}, _ctx()).loss
    loss.backward()
    grads = {name: p.grad for name, p in objective.named_parameters() if p.grad is not None}
    assert any(name.startswith("predictor") for name in grads) and any(name.startswith("encoder") for name in grads)
    for rank in (0, 1):
        got = results[rank]
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-10)
        assert got["collapsed"] == pytest.approx(2 * 0.2 * math.log(2 * BATCH), rel=1e-6)
        assert sorted(got["grads"]) == sorted(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-8, atol=1e-11, msg=name)
