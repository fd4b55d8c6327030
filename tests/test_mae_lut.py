"""MAE + LUT (``objectives/mae_lut.py``): disjoint visible sets from one noise, the EMA teacher of the whole student,
the cross-view loss, the total, two gloo processes against one (the checkpoint round trip: test_objective_platform)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import spawn_two

from maskray.config import load_config
from maskray.context import StepContext
from maskray.distributed import all_reduce_mean
from maskray.errors import ConfigError
from maskray.models import build_encoder
from maskray.objective import build_objective, validate_objective
from maskray.passes import run_passes
from maskray.schedules import cosine_schedule
from objectives.mae import MAE
from objectives.mae_lut import MAELUT, cosine_distance, cross_view_loss

BATCH = 8  # 16x16 images, patch 4: 16 patches, 4 visible per view


def _lut(*overrides: str) -> MAELUT:
    config = load_config(None, ["objective.name=mae_lut", "objective.head_dim=64", *overrides])
    torch.manual_seed(0)
    return build_objective(config.objective.name, config.objective.params, build_encoder(config.model))


def _batch(size: int = BATCH, seed: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(size, 3, 16, 16, generator=generator, dtype=dtype) for name in ("image", "augmented")}


def _ctx(seed: int = 7) -> StepContext:
    return StepContext(step=0, total_steps=10, generator=torch.Generator().manual_seed(seed))


def test_visible_sets_are_disjoint_and_of_the_exact_size(one_thread) -> None:
    objective = _lut()
    outputs = run_passes(objective.encoder, _batch(), objective.passes(), _ctx().generator)
    first, second = outputs["visible"], outputs["augmented"]
    assert first.indices.ids_keep.shape == second.indices.ids_keep.shape == (BATCH, 4)
    assert first.out.tokens.shape == second.out.tokens.shape == (BATCH, 5, 192)
    for row_a, row_b in zip(first.indices.ids_keep.tolist(), second.indices.ids_keep.tolist(), strict=True):
        assert len(set(row_a)) == len(set(row_b)) == 4 and not set(row_a) & set(row_b)
    assert torch.equal(first.mask.sum(1), torch.full((BATCH,), 12.0))
    assert torch.equal(second.mask.sum(1), torch.full((BATCH,), 12.0))
    assert torch.all(first.mask + second.mask >= 1)  # no patch visible in both
    ranks = torch.rand(BATCH, 16, generator=_ctx().generator).argsort(dim=1)  # the one noise draw
    assert torch.equal(first.indices.ids_keep, ranks[:, :4]) and torch.equal(second.indices.ids_keep, ranks[:, 4:8])


def test_a_mask_ratio_without_room_for_two_disjoint_views_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"key 'objective.mask_ratio'"):
        validate_objective("mae_lut", {"mask_ratio": 0.4})


def test_ema_teacher_follows_the_whole_student_and_leaves_its_gradients_alone(one_thread) -> None:
    """The formula itself: test_objective_platform.py::test_ema_teacher_follows_the_formula_and_never_gets_gradients
    (its ``mae_lut`` case)."""
    objective = _lut()
    teacher = objective.teachers()["teacher"]
    assert teacher.include_buffers
    assert set(teacher.module.state_dict()) == set(objective.state_dict())  # encoder, decoder, both heads
    assert teacher.momentum(0, 100) == pytest.approx(0.996) and teacher.momentum(99, 100) == pytest.approx(1.0)
    objective.train()
    objective(_batch(), _ctx()).loss.backward()  # moves the student's BN running statistics, fills its grads
    assert any(name.endswith("running_var") for name, _ in teacher.module.named_buffers())
    grads = {name: p.grad.clone() for name, p in objective.named_parameters() if p.grad is not None}
    before = teacher.module.projector[1].running_mean.clone()
    m = objective.after_optimizer_step(StepContext(step=3, total_steps=10))["momentum/teacher"]
    assert m == cosine_schedule(3, 10, 0.996, 1.0)
    assert not torch.equal(teacher.module.projector[1].running_mean, before)
    assert all(p.grad is None for p in teacher.parameters())
    for name, p in objective.named_parameters():
        if name in grads:
            assert torch.equal(p.grad, grads[name]), name


def test_cross_view_loss_on_hand_values() -> None:
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [4.0, 3.0], [-5.0, 0.0]])
    torch.testing.assert_close(cosine_distance(a, b), torch.tensor([2.0, 2 - 2 * 24 / 25, 4.0]))
    torch.testing.assert_close(cosine_distance(a, 7 * a), torch.zeros(3), rtol=0, atol=1e-6)
    unit = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    torch.testing.assert_close(cross_view_loss((unit, unit), (unit, unit)), torch.tensor(0.0), rtol=0, atol=1e-6)
    # cross-view pairs only: each student equals its own view's target, the other view's is orthogonal
    s1, s2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert cross_view_loss((s1, s2), (s1, s2)).item() == pytest.approx(2.0)
    assert cross_view_loss((s1, s2), (s2, s1)).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="two \\(B, D\\) tensors"):
        cosine_distance(a, b[:, :1])


def test_total_is_mae_plus_a_quarter_of_the_cross_view_loss(one_thread) -> None:
    objective = _lut()
    objective.train()
    batch = _batch()
    out = objective(batch, _ctx())
    mae = MAE(objective.encoder, MAE.Config())
    mae.decoder.load_state_dict(objective.decoder.state_dict())
    mae_loss = mae({"image": batch["image"]}, _ctx()).loss  # the same noise draw: MAE's mask is view 1's
    assert torch.equal(out.metrics["mae_loss"], mae_loss.detach())
    # the BC term by hand: mean of visible patch tokens (student, predictor on projector), all patches (teacher)
    ranks = torch.rand(BATCH, 16, generator=_ctx().generator).argsort(dim=1)
    students = [objective.predictor(objective.projector(objective.encoder(batch[view], ids_keep=keep).patches
                                                        .mean(1)))
                for view, keep in (("image", ranks[:, :4]), ("augmented", ranks[:, 4:8]))]
    teacher = objective.teacher.module.eval()
    with torch.no_grad():
        targets = [teacher.projector(teacher.encoder(batch[view]).patches.mean(1)) for view in ("image", "augmented")]
    bc = (cosine_distance(students[1], targets[0]).mean() + cosine_distance(students[0], targets[1]).mean()) / 2
    torch.testing.assert_close(out.metrics["bc_loss"], bc.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, mae_loss + 0.25 * bc, rtol=1e-6, atol=1e-6)
    assert out.loss.item() == pytest.approx(out.metrics["mae_loss"].item() + 0.25 * out.metrics["bc_loss"].item())
    without = _lut("objective.bc_weight=0")
    assert torch.equal(without(batch, _ctx()).loss, mae_loss)


# --- two gloo processes, each half the batch, against one process on the whole batch (float64) ------------------
def _double_lut() -> MAELUT:
    objective = _lut().double()
    objective.teacher.module.double()
    objective.teacher.dtype = torch.float64
    with torch.no_grad():  # a teacher that differs from the student, with non-trivial BN running statistics
        for name, value in objective.teacher.module.state_dict().items():
            if value.is_floating_point():
                generator = torch.Generator().manual_seed(len(name))
                value.add_(0.05 * torch.rand(value.shape, generator=generator, dtype=value.dtype))
    return objective.train()


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    objective = _double_lut()
    half = BATCH // 2
    batch = {name: value[rank * half : (rank + 1) * half] for name, value in _batch(dtype=torch.float64).items()}
    generator = torch.Generator().manual_seed(7)
    if rank == 1:  # this rank's noise: rows half.. of the one-process draw
        torch.rand(half, 16, generator=generator)
    out = objective(batch, StepContext(0, 10, rank=rank, world_size=2, generator=generator))
    out.loss.backward()
    grads = {}
    for name, param in objective.named_parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            grads[name] = param.grad / 2
    results[rank] = {"loss": all_reduce_mean(out.loss).item(), "grads": grads,
                     "buffers": {name: b.clone() for name, b in objective.named_buffers() if "running" in name}}
    dist.destroy_process_group()


def test_two_processes_on_half_batches_equal_one_process_on_the_whole_batch(one_thread) -> None:
    results = spawn_two(_worker)

    objective = _double_lut()
    out = objective(_batch(dtype=torch.float64), _ctx(7))
    out.loss.backward()
    grads = {name: p.grad for name, p in objective.named_parameters() if p.grad is not None}
    assert any(name.startswith("projector") for name in grads) and any(name.startswith("decoder") for name in grads)
    for rank in (0, 1):
        got = results[rank]
        assert got["loss"] == pytest.approx(out.loss.item(), rel=1e-12)
        assert got["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name)
        for name, buffer in objective.named_buffers():
            if "running" in name:
                torch.testing.assert_close(got["buffers"][name], buffer, rtol=1e-9, atol=1e-12, msg=name)


# The checkpoint round trip (teacher, heads and BN statistics resume exactly): test_objective_platform.py::
# test_training_state_round_trip_is_bit_exact[mae_lut].
