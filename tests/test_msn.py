"""MSN: each loss step on tiny tensors (sharpening, Sinkhorn marginals, ME-MAX values, the bf16 failure of the
reference's forms), the loss and its gradients over two gloo ranks against one process, the EMA target and its
schedule, and one objective step (views, passes, groups, gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import yaml
from helpers import spawn_two

from maskray.config import load_config
from maskray.context import StepContext
from maskray.errors import ConfigError
from maskray.models import build_encoder
from maskray.objective import build_objective, validate_objective
from objectives.msn import (
    global_mean_prediction,
    me_max,
    prototype_log_probs,
    sharpen,
    sinkhorn,
    soft_cross_entropy,
)


def _log_probs(rows: int, k: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(rows, k, generator=generator, dtype=torch.float64), dim=1)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(dim=1)


# -- sharpening --------------------------------------------------------------------------------------------------
def test_sharpen_is_the_reference_power_form_and_lowers_entropy() -> None:
    log_p = _log_probs(5, 7)
    p = log_p.exp()
    torch.testing.assert_close(sharpen(log_p, 1.0), p.float())
    sharp = sharpen(log_p, 0.25)
    reference = p ** 4 / (p ** 4).sum(dim=1, keepdim=True)
    torch.testing.assert_close(sharp, reference.float())
    torch.testing.assert_close(sharp.sum(dim=1), torch.ones(5))
    assert bool((_entropy(sharp.double()) < _entropy(p)).all())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sharpen(log_p, 0.0)
    with pytest.raises(ValueError, match=r"\(N, K\) matrix"):
        sharpen(log_p[0], 0.25)


def test_bf16_reference_forms_fail_where_the_log_space_ones_do_not() -> None:
    """The reference's ``p ** (1/T)`` underflows to 0/0 for a near-uniform bf16 prediction at T = 0.05, and its
    ``log(p ** -q)`` is inf once an anchor probability underflowed to 0 (a sharp bf16 softmax)."""
    log_p = _log_probs(4, 1024, scale=0.1).float()
    p = log_p.exp().bfloat16()
    reference = p ** (1 / 0.05)
    reference = reference / reference.sum(dim=1, keepdim=True)
    assert bool(reference.isnan().all())
    ours = sharpen(p.float().log(), 0.05)
    assert bool(ours.isfinite().all())
    torch.testing.assert_close(ours, sharpen(log_p, 0.05), rtol=0.05, atol=1e-3)  # bf16 inputs, within rounding

    anchor_logits = (100 * torch.randn(4, 1024, generator=torch.Generator().manual_seed(1))).bfloat16()
    anchor = torch.softmax(anchor_logits, dim=1)
    targets = _log_probs(4, 1024, seed=2).exp().bfloat16()
    assert bool((anchor == 0).any())
    assert torch.mean(torch.sum(torch.log(anchor ** (-targets)), dim=1)).isinf()
    ours = soft_cross_entropy(targets.float(), torch.log_softmax(anchor_logits.float(), dim=1))
    want = soft_cross_entropy(targets.double(), torch.log_softmax(anchor_logits.double(), dim=1))
    assert ours.isfinite() and abs(ours.item() - want.item()) < 1e-3 * want.item()


def test_soft_cross_entropy_and_prototype_log_probs() -> None:
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    log_p = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    assert soft_cross_entropy(targets, log_p).item() == pytest.approx((math.log(4) + math.log(2)) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        soft_cross_entropy(targets, log_p[:1])
    z, prototypes = torch.randn(3, 4), torch.randn(5, 4)
    out = prototype_log_probs(2.0 * z, 3.0 * prototypes, 0.1)  # cosine: scale-free
    torch.testing.assert_close(out, prototype_log_probs(z, prototypes, 0.1))
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="z has 4 features, the prototypes 3"):
        prototype_log_probs(z, prototypes[:, :3], 0.1)


# -- Sinkhorn and ME-MAX ---------------------------------------------------------------------------------------------
def test_sinkhorn_marginals() -> None:
    probs = _log_probs(64, 16, scale=3.0).exp()
    balanced = sinkhorn(probs, 3)
    torch.testing.assert_close(balanced.sum(dim=1), torch.ones(64, dtype=torch.float32))
    columns = balanced.sum(dim=0) / (64 / 16)
    assert float((columns - 1).abs().max()) < 0.2  # 3 iterations: close to B/K per prototype
    assert float((probs.sum(dim=0) / 4 - 1).abs().max()) > 0.3  # far from it before
    converged = sinkhorn(probs, 200).sum(dim=0) / 4
    torch.testing.assert_close(converged, torch.ones(16), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="iterations >= 1"):
        sinkhorn(probs, 0)
    with pytest.raises(ValueError, match="non-negative"):
        sinkhorn(-probs, 3)


def test_me_max_values_and_sign() -> None:
    k = 1024
    assert abs(me_max(torch.full((k,), 1.0 / k)).item()) < 1e-5  # uniform mean prediction: 0
    one_hot = torch.zeros(k)
    one_hot[3] = 1.0
    assert me_max(one_hot).item() == pytest.approx(math.log(k))  # collapsed: log K = 6.931
    skewed = torch.softmax(torch.randn(k), dim=0)
    assert 0.0 < me_max(skewed).item() < math.log(k)
    with pytest.raises(ValueError, match=r"\(K,\) vector"):
        me_max(one_hot[None])


# -- across ranks ----------------------------------------------------------------------------------------------------
BATCH, DIM, K = 6, 5, 4


def _problem() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(*shape, generator=generator, dtype=torch.float64) for name, shape in
            (("anchors", (2, 2 * BATCH, DIM)), ("targets", (2 * BATCH, DIM)), ("weight", (DIM, DIM)),
             ("prototypes", (K, DIM)))}


def _msn_loss(problem: dict[str, torch.Tensor], rows: slice) -> tuple[torch.Tensor, torch.Tensor, list]:
    """CE of 2 anchor views (view-major) against the sharpened, Sinkhorn-balanced targets, plus ME-MAX, over the
    rows ``rows`` of the batch; returns (loss, the Sinkhorn targets, the leaf tensors)."""
    weight = problem["weight"].clone().requires_grad_(True)
    prototypes = problem["prototypes"].clone().requires_grad_(True)
    anchors = torch.cat([view[rows] @ weight for view in problem["anchors"]])
    anchor_log_probs = prototype_log_probs(anchors, prototypes, 0.5).double()
    with torch.no_grad():
        targets = sinkhorn(sharpen(prototype_log_probs(problem["targets"][rows], prototypes, 0.5), 0.5), 3)
    loss = soft_cross_entropy(targets.double().repeat(2, 1), anchor_log_probs)
    loss = loss + me_max(global_mean_prediction(anchor_log_probs.exp()))
    return loss, targets, [weight, prototypes]


def _rank_worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    loss, targets, leaves = _msn_loss(_problem(), slice(rank * BATCH, (rank + 1) * BATCH))
    loss.backward()
    grads = [leaf.grad.clone() for leaf in leaves]
    for grad in grads:  # DeepSpeed averages gradients over ranks
        dist.all_reduce(grad)
    total = loss.detach().clone()
    dist.all_reduce(total)
    results[rank] = {"loss": total.item() / 2, "targets": targets, "grads": [g / 2 for g in grads]}
    dist.destroy_process_group()


def test_sinkhorn_and_me_max_over_two_ranks_equal_one_process() -> None:
    results = spawn_two(_rank_worker)
    loss, targets, leaves = _msn_loss(_problem(), slice(None))
    loss.backward()
    for rank in (0, 1):
        assert results[rank]["loss"] == pytest.approx(loss.item(), rel=1e-6)
        torch.testing.assert_close(results[rank]["targets"], targets[rank * BATCH : (rank + 1) * BATCH])
        for got, leaf in zip(results[rank]["grads"], leaves, strict=True):
            torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-8)


# -- the objective ---------------------------------------------------------------------------------------------------
def _msn(*overrides: str):
    config = load_config(None, ["model.img_size=32", "model.patch_size=4", "model.depth=1", "objective.name=msn",
                                "objective.focal_views=2", "objective.focal_size=16", "objective.proj_hidden=16",
                                "objective.proj_dim=8", "objective.num_prototypes=6", *overrides])
    torch.manual_seed(0)
    return config, build_objective("msn", config.objective.params, build_encoder(config.model))


def test_momentum_schedule_and_ema_of_backbone_and_projector() -> None:
    """The formula itself: test_objective_platform.py::test_ema_teacher_follows_the_formula_and_never_gets_gradients
    (its ``msn`` case)."""
    _, objective = _msn()
    teacher = objective.target
    total = 1000
    assert teacher.momentum(0, total) == pytest.approx(0.996)
    assert teacher.momentum(total - 1, total) == pytest.approx(0.996 + 0.004 * 999 / 1250)  # ~0.9992
    assert objective.eval_encoder() is teacher.module.encoder
    students = [*objective.encoder.parameters(), *objective.projector.parameters()]
    assert [id(p) for p in teacher.student.parameters()] == [id(p) for p in students]
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in objective.parameters()}
    assert teacher.update(0, total) == pytest.approx(0.996)


def test_objective_step_views_passes_and_gradients() -> None:
    config, objective = _msn()
    views = objective.inputs(config.model, config.data).shapes()["views"]
    assert views == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2  # target, masked random anchor, 2 focal
    batch = {"views": [torch.randn(4, *shape) for shape in views]}
    passes = objective.passes()
    assert [p.view for p in passes.values()] == ["views.1", "views.2", "views.3"]
    assert passes["random0"].mask.ratio == 0.15 and passes["focal0"].mask is None
    out = objective(batch, StepContext(0, 10, generator=torch.Generator().manual_seed(0)))
    assert out.loss.isfinite() and set(out.metrics) == {"ce", "me_max", "target_prototypes", "target_max"}
    out.loss.backward()
    for name in ("encoder.vit.patch_embed.proj.weight", "projector.0.weight", "prototypes"):
        assert objective.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in objective.target.parameters())
    norms = [m for m in objective.target.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.training for m in norms)  # batch norm on the target batch's statistics, as the reference
    groups = objective.param_groups(weight_decay=0.04)
    assert [g["weight_decay"] for g in groups if any(p is objective.prototypes for p in g["params"])] == [0.0]

    from maskray.passes import run_passes

    tokens = run_passes(objective.encoder, batch, passes, torch.Generator().manual_seed(0))
    assert tokens["random0"].out.tokens.shape[1] == 1 + int(64 * 0.85)  # CLS + 54 of 64 patches
    assert tokens["focal0"].out.tokens.shape[1] == 1 + 16
    assert not torch.equal(tokens["random0"].mask[0], tokens["random0"].mask[1])  # per-sample masks


def test_bad_config_names_the_key() -> None:
    config, objective = _msn("objective.focal_size=14")
    with pytest.raises(ConfigError, match="objective.focal_size"):
        objective.check(config.model, config.data, "objective")
    for key, value in (("color_jitter", "[0.4,0.4,0.4,0.6]"), ("focal_crop_scale", "[0.5,0.2]"),
                       ("blur_sigma", "[0,1]"), ("random_views", "0")):
        with pytest.raises(ConfigError, match=f"objective.{key}"):
            validate_objective("msn", {key: yaml.safe_load(value)})
