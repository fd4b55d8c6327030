"""DTM (``objectives/dtm.py``): token grouping, morphing, the loss, the per-step schedule, and the objective with its
frozen teacher (config, re-normalisation, run params and tags)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from maskray.config import load_config
from maskray.context import StepContext
from maskray.errors import ConfigError
from maskray.models import build_encoder
from maskray.objective import build_objective, validate_objective
from maskray.run_spec import build_run_spec
from maskray.teacher_sources import RANDOM_TAG, renormalize
from objectives.dtm import (
    draw_schedule,
    dtm_loss,
    group_projector,
    merge_round,
    morph,
    morph_groups,
    smooth_l1,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
RANDOM_TEACHER = ("objective.teacher={source: random, arch: vit_tiny_patch16_224, "
                  "model_kwargs: {patch_size: 4, depth: 2}}")


def _features(batch: int = 3, length: int = 16, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("rounds", "r", "protect_first"), [(1, 3, False), (4, 2, True), (3, 9, False), (6, 7, True)])
def test_each_token_lands_in_exactly_one_group(rounds, r, protect_first) -> None:
    features = _features()
    groups = morph_groups(features, rounds, r, protect_first)
    assert set(groups.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(groups.sum(1), torch.ones(3, 16))  # every column sums to 1
    assert (groups.sum(-1) > 0).all()  # no empty group
    t, merged = 16, 0  # merges per round: min(r, (t - protect_first) // 2)
    for _ in range(rounds):
        step = min(r, (t - int(protect_first)) // 2)
        merged, t = merged + step, t - step
    assert groups.shape[1] == 16 - merged
    if protect_first:  # the reference's quirk: patch 0 stays alone
        assert (groups[groups[:, :, 0] == 1].sum(-1) == 1).all()


def test_merge_round_merges_identical_pairs_and_averages_by_size() -> None:
    basis = torch.eye(8)  # tokens 2j and 2j+1 identical, different pairs orthogonal
    features = basis.repeat_interleave(2, dim=0).unsqueeze(0) * torch.arange(1.0, 17.0).view(1, 16, 1)
    size, source = torch.ones(1, 16, 1), torch.eye(16).unsqueeze(0)
    x, new_size, new_source = merge_round(features, size, source, r=7, protect_first=True)
    pairs = {tuple(torch.nonzero(row).flatten().tolist()) for row in new_source[0]}
    assert pairs == {(0,), (1,)} | {(2 * j, 2 * j + 1) for j in range(1, 8)}  # pair 0 unmerged (the quirk)
    merged_row = next(i for i, row in enumerate(new_source[0]) if row[2] and row[3])
    torch.testing.assert_close(x[0, merged_row], features[0, 2:4].mean(0))  # size-weighted mean of 3e1 and 4e1
    assert new_size[0, merged_row].item() == 2
    _, _, all_pairs = merge_round(features, size, source, r=8, protect_first=False)
    assert {tuple(torch.nonzero(row).flatten().tolist()) for row in all_pairs[0]} == {
        (2 * j, 2 * j + 1) for j in range(8)}


def test_projector_is_symmetric_stochastic_and_morphing_idempotent() -> None:
    features = _features()
    projector = group_projector(morph_groups(features, 3, 3))
    torch.testing.assert_close(projector, projector.transpose(1, 2))
    torch.testing.assert_close(projector.sum(-1), torch.ones(3, 16), atol=1e-5, rtol=0)
    tokens = _features(dim=5, seed=1)
    once = morph(tokens, projector)
    torch.testing.assert_close(morph(once, projector), once, atol=1e-5, rtol=0)
    groups = morph_groups(features, 3, 3)
    assert projector.diagonal(dim1=1, dim2=2).sum(-1).round().tolist() == [groups.shape[1]] * 3  # trace = groups


def test_no_merge_is_the_identity_and_constant_targets_stay() -> None:
    features = _features()
    assert torch.equal(group_projector(morph_groups(features, 5, 0)), torch.eye(16).expand(3, 16, 16) / (1 + 1e-6))
    constant = torch.ones(2, 16, 8) * torch.randn(1, 1, 8)
    projector = group_projector(morph_groups(constant + 1e-3 * _features(2), 4, 3))
    torch.testing.assert_close(morph(constant, projector), constant, atol=1e-5, rtol=0)


def test_smooth_l1_known_values() -> None:
    values = smooth_l1(torch.tensor([0.0, 1.0, -1.0, 3.0, 2.0]), beta=2.0)
    torch.testing.assert_close(values, torch.tensor([0.0, 0.25, 0.25, 2.0, 1.0]))
    with pytest.raises(ValueError, match="beta"):
        smooth_l1(torch.zeros(1), beta=0.0)


def test_morphed_loss_never_exceeds_the_unmorphed_one() -> None:
    """Jensen: smooth-L1 is convex, so a group's g * f(mean of d) <= sum of f(d) over the group, per element."""
    for seed in range(6):
        targets = _features(seed=seed) * 3
        predictions = _features(seed=seed + 100) * 3  # differences on both sides of beta
        identity = [torch.eye(16).expand(3, 16, 16)]
        unmorphed = dtm_loss(predictions, targets, identity)
        torch.testing.assert_close(unmorphed, smooth_l1(predictions - targets).mean())
        for rounds, r in ((1, 7), (3, 2), (8, 1)):
            projectors = [group_projector(morph_groups(targets, rounds, r))]
            assert dtm_loss(predictions, targets, projectors) <= unmorphed + 1e-6
    with pytest.raises(ValueError, match="differ"):
        dtm_loss(predictions, targets[:, :8], identity)


def test_schedule_follows_the_reference_rule_and_is_reproducible() -> None:
    def schedule(seed: int, step: int, rank: int):
        ctx = StepContext(step, 100, rank=rank, seed=seed)
        return draw_schedule(ctx.step_generator("dtm"), 2, 196, 14)

    assert schedule(0, 5, 0) == schedule(0, 5, 0)
    draws = {str(schedule(seed, step, rank)) for seed in (0, 1) for step in (0, 1, 2) for rank in (0, 1)}
    assert len(draws) == 12  # seed, step and rank each change the draw
    for seed in range(40):
        for n, k, r in schedule(seed, 0, 0):
            assert 0 <= n <= 196 and 1 <= k <= 14
            assert r == (math.ceil(n / k) if math.ceil(n / k) * k <= 196 else n // k)


def _dtm_config(*overrides: str):
    return load_config(REPO / "configs" / "demo" / "dtm.yaml", [RANDOM_TEACHER, *overrides])


def test_dtm_objective_step_masks_morphs_and_learns() -> None:
    """A few optimizer steps on random images with a frozen random teacher: the loss goes down, the morphed loss
    stays at or below the per-token one, the teacher stays frozen."""
    config = _dtm_config("model.depth=2")
    torch.manual_seed(0)
    objective = build_objective("dtm", config.objective.params, build_encoder(config.model))
    views = objective.inputs(config.model, config.data)
    assert views.shapes()["mask"] == (64,)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 64, dtype=torch.long)
    mask[:, :24] = 1
    batch = {"image": images, "mask": mask}
    teacher_state = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    optimizer = torch.optim.AdamW(objective.param_groups(0.0), lr=2e-3)
    losses = []
    for step in range(25):
        out = objective(batch, StepContext(step, 25, seed=0, generator=torch.Generator().manual_seed(step)))
        assert out.loss <= out.metrics["token_loss"] + 1e-6 and 1 <= out.metrics["groups"] <= 64
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert all(torch.equal(v, teacher_state[k]) for k, v in objective.teacher.state_dict().items())
    mean, std = objective.student_stats
    expected = objective.teacher(renormalize(images, mean, std, objective.teacher.mean, objective.teacher.std))
    torch.testing.assert_close(objective.targets(images), expected)


def test_dtm_config_errors_name_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"key 'objective.teacher'"):
        _spec(load_config(REPO / "configs" / "demo" / "dtm.yaml", ["objective.teacher=null"]))
    missing = load_config(REPO / "configs" / "demo" / "dtm.yaml", [f"objective.teacher.path={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match=r"key 'objective.teacher.path': no such file"):  # the driver, first
        _spec(missing)
    with pytest.raises(ConfigError, match=r"unknown key 'objective.teacher.colour'"):
        _spec(_dtm_config("objective.teacher.colour=1"))
    with pytest.raises(ConfigError, match=r"key 'objective.teacher.img_size'"):  # a 4x4 teacher grid, 8x8 student
        _spec(_dtm_config("objective.teacher.img_size=16"))


def _spec(config):
    """The run specification of ``config`` (its data is the test's own concern)."""
    return build_run_spec(config, check_data_too=False)


def test_run_records_the_teacher_and_resolves_its_path(tmp_path, monkeypatch) -> None:
    spec = _spec(_dtm_config())
    params, tags = spec.params, spec.tags
    assert spec.objective.teacher.sha256 == params["objective.teacher.sha256"]  # pinned for the workers
    assert params["objective.teacher.source"] == "random" and len(params["objective.teacher.sha256"]) == 64
    assert params["objective.teacher.resolved"] == "random vit_tiny_patch16_224 seed 0"
    assert tags["teacher"] == RANDOM_TAG and tags["objective"] == "dtm"
    # a relative teacher path is relative to the project root, and absolute for the workers
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "t.safetensors").write_bytes(b"")
    monkeypatch.setenv("MASKRAY_ROOT", str(tmp_path))
    overrides = ["objective.teacher={source: timm, arch: vit_tiny_patch16_224, path: teachers/t.safetensors}"]
    config = load_config(REPO / "configs" / "demo" / "dtm.yaml", overrides).resolved()
    resolved = validate_objective("dtm", config.objective.params).resolved(tmp_path, config.tracking.uri)
    assert resolved.teacher.path == str(tmp_path / "teachers" / "t.safetensors")
    assert resolved.mask_ratio == 0.3827 and "protect_first" not in resolved.model_fields_set
    composite = load_config(None, ["objective.name=composite", "objective.parts=[{name: dtm, "
                                   "teacher: {source: timm, arch: vit_tiny_patch16_224, path: teachers/t.safetensors}}]"
                                   ]).resolved()
    typed = validate_objective("composite", composite.objective.params).resolved(tmp_path, composite.tracking.uri)
    specs = typed.teacher_specs("objective")
    assert list(specs) == ["objective.parts[0].teacher"]
    assert specs["objective.parts[0].teacher"].path == str(tmp_path / "teachers" / "t.safetensors")
    with pytest.raises(ConfigError, match=r"key 'objective.parts\[0\].teacher.path'"):  # an empty file
        _spec(composite)

