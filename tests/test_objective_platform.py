"""The objective platform without Ray: MAE's port, passes and composites, EMA teachers under gradient accumulation,
frozen teachers, parameter groups, checkpointed state, per-rank generators, collectives and the config errors."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from maskray.config import load_config
from maskray.context import RankRandomness, StepContext, derived_seed
from maskray.distributed import all_gather_with_grad, all_reduce_mean
from maskray.engine.deepspeed_setup import build_engine, build_optimizer
from maskray.engine.optimizer import GroupClippedAdamW
from maskray.engine.step import optimizer_step, to_device
from maskray.engine.training_state import load_training_state, save_training_state
from maskray.errors import ConfigError
from maskray.models import build_encoder
from maskray.objective import Objective, ObjectiveOutput, ParamGroupSpec, build_objective, validate_objective
from maskray.passes import EncoderPass, MaskSpec, run_passes
from maskray.schedules import cosine_schedule, linear_schedule
from maskray.teachers import EMATeacher, FrozenTeacher

FIXTURES = Path(__file__).parent / "fixtures"
PRE_PLATFORM_CHECKPOINT = FIXTURES / "pre_platform" / "runs" / "pre-platform" / "checkpoint_step2"


def _fill(objective: nn.Module) -> None:
    """The fixture's weights: each trainable parameter from a generator seeded by the CRC32 of its name."""
    with torch.no_grad():
        for name, param in objective.named_parameters():
            if param.requires_grad:
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                base = 1.0 if (param.ndim == 1 and name.endswith("weight")) else 0.0
                param.copy_(base + 0.05 * torch.randn(param.shape, generator=generator))


def _ctx(seed: int = 99) -> StepContext:
    return StepContext(step=0, total_steps=10, generator=torch.Generator().manual_seed(seed))


def _mae(*overrides: str):
    config = load_config(None, list(overrides))
    return build_objective(config.objective.name, config.objective.params, build_encoder(config.model)), config


def test_mae_port_reproduces_the_recorded_loss_and_gradients() -> None:
    """Values recorded with the pre-platform MAE (tests/fixtures/README.md) for the same weights and noise."""
    recorded = json.loads((FIXTURES / "mae_pre_port.json").read_text())
    objective, _ = _mae()
    for module in objective.decoder.modules():  # recorded before the decoder took the reference's eps 1e-6
        if isinstance(module, nn.LayerNorm):
            module.eps = 1e-5
    _fill(objective)
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1234))
    out = objective({"image": images}, _ctx(99))  # the step generator draws the recorded noise: rand(8, 16)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(recorded["loss"], rel=1e-6)
    grads = {name: p.grad.double().norm().item() for name, p in objective.named_parameters() if p.grad is not None}
    assert grads.keys() == recorded["grads"].keys()
    for name, value in recorded["grads"].items():
        assert grads[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name


class _Counting:
    """Counts the encoder's forward calls (forward pre-hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.calls += 1


def test_composite_runs_each_distinct_pass_once() -> None:
    same, _ = _mae("objective.name=composite", "objective.parts=[{name: mae}, {name: mae, decoder_depth: 1}]")
    counter = _Counting(same.encoder)
    out = same({"image": torch.randn(4, 3, 16, 16)}, _ctx())
    assert counter.calls == 1
    assert set(out.metrics) >= {"mae/loss", "mae_1/loss", "mae/mask_ratio", "mae_1/mask_ratio"}
    other, _ = _mae("objective.name=composite", "objective.parts=[{name: mae}, {name: mae, mask_ratio: 0.5}]")
    counter = _Counting(other.encoder)
    other({"image": torch.randn(4, 3, 16, 16)}, _ctx())
    assert counter.calls == 2


def test_composite_of_one_part_is_that_part_and_weights_apply_once() -> None:
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain, _ = _mae()
    _fill(plain)
    reference = plain({"image": images}, _ctx())
    reference.loss.backward()
    for weight in (1.0, 0.5):
        composite, _ = _mae("objective.name=composite", f"objective.parts=[{{name: mae, weight: {weight}}}]")
        with torch.no_grad():  # same order: encoder.* then (parts.mae.)decoder.*
            for (_, mine), (_, theirs) in zip(composite.named_parameters(), plain.named_parameters(), strict=True):
                mine.copy_(theirs)
        out = composite({"image": images}, _ctx())
        out.loss.backward()
        if weight == 1.0:
            assert torch.equal(out.loss, reference.loss)
        else:
            assert out.loss.item() == pytest.approx(weight * reference.loss.item(), rel=1e-7)
        assert out.metrics["mae/loss"].item() == pytest.approx(reference.loss.item(), rel=1e-7)
        for (name, mine), (_, theirs) in zip(composite.named_parameters(), plain.named_parameters(), strict=True):
            if theirs.grad is None:
                continue
            if weight == 1.0:
                assert torch.equal(mine.grad, theirs.grad), name
            else:
                torch.testing.assert_close(mine.grad, weight * theirs.grad, rtol=1e-6, atol=1e-9, msg=name)


def test_composite_config_errors_name_the_part_key() -> None:
    with pytest.raises(ConfigError, match=r"key 'objective.parts\[1\].mask_ratio'"):
        validate_objective("composite", {"parts": [{"name": "mae"}, {"name": "mae", "mask_ratio": 2}]})
    with pytest.raises(ConfigError, match=r"unknown key 'objective.parts\[0\].bogus'"):
        validate_objective("composite", {"parts": [{"name": "mae", "bogus": 1}]})
    with pytest.raises(ConfigError, match=r"key 'objective.parts\[0\].name': unknown objective 'nope'"):
        validate_objective("composite", {"parts": [{"name": "nope"}]})
    with pytest.raises(ConfigError, match=r"key 'objective.eval_part'"):
        validate_objective("composite", {"parts": [{"name": "mae"}], "eval_part": "x"})


def test_random_mask_chunks_are_disjoint_and_share_one_noise_draw() -> None:
    objective, _ = _mae()
    passes = {
        "a": EncoderPass("image", MaskSpec("random", ratio=0.75, noise="shared")),
        "b": EncoderPass("image", MaskSpec("random", ratio=0.75, noise="shared", chunk=1)),
        "c": EncoderPass("image", MaskSpec("random", ratio=0.75, noise="shared", chunk=1)),
    }
    outputs = run_passes(objective.encoder, {"image": torch.randn(5, 3, 16, 16)}, passes, _ctx().generator)
    first, second = outputs["a"].indices.ids_keep, outputs["b"].indices.ids_keep
    assert first.shape == second.shape == (5, 4)
    for row_a, row_b in zip(first.tolist(), second.tolist(), strict=True):
        assert not set(row_a) & set(row_b)
    assert outputs["b"] is outputs["c"]
    noise = torch.rand(5, 16, generator=_ctx().generator)  # one draw served both masks
    ranks = noise.argsort(dim=1, stable=True)
    assert torch.equal(first, ranks[:, :4]) and torch.equal(second, ranks[:, 4:8])


def test_batch_masks_drive_replace_and_drop_passes() -> None:
    objective, _ = _mae()
    objective.encoder.add_mask_token()
    mask = torch.zeros(2, 16)
    mask[0, :6] = 1
    mask[1, 10:] = 1
    batch = {"image": torch.randn(2, 3, 16, 16), "mask": mask}
    out = run_passes(objective.encoder, batch, {
        "replace": EncoderPass("image", MaskSpec("batch", mode="replace", key="mask")),
        "drop": EncoderPass("image", MaskSpec("batch", key="mask")),
    }, None)
    assert out["replace"].out.tokens.shape == (2, 17, 192)
    assert out["drop"].out.tokens.shape == (2, 11, 192)
    assert sorted(out["drop"].indices.ids_keep[1].tolist()) == list(range(10))
    ragged = mask.clone()
    ragged[0, 7] = 1
    with pytest.raises(ValueError, match="same number of patches"):
        drop = {"d": EncoderPass("image", MaskSpec("batch", key="mask"))}
        run_passes(objective.encoder, {**batch, "mask": ragged}, drop, None)


def test_schedules_validate_and_reach_their_ends() -> None:
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(99, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert linear_schedule(100, 125, 0.996, 1.0) == pytest.approx(0.996 + 0.004 * 0.8)
    with pytest.raises(ValueError, match="step must be >= 0"):
        cosine_schedule(-1, 10, 0.0, 1.0)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        linear_schedule(0, 0, 0.0, 1.0)


def _plain_teacher():
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    return EMATeacher(student, lambda step, total: 0.5, include_buffers=True)


def _objective_teacher(name: str, overrides: tuple[str, ...], pick):
    def build():
        config = load_config(None, [f"objective.name={name}", *overrides])
        torch.manual_seed(0)
        return pick(build_objective(name, config.objective.params, build_encoder(config.model)))

    return build


# every EMA teacher of the platform and of the objectives: (the teacher, built afresh) -> EMATeacher
EMA_TEACHERS = {
    "buffers": _plain_teacher,  # a plain module with batch norm, include_buffers
    "mae_lut": _objective_teacher("mae_lut", ("objective.head_dim=64",), lambda o: o.teachers()["teacher"]),
    "moco_v3": _objective_teacher("moco_v3", ("model.depth=2", "objective.mlp_dim=32", "objective.out_dim=16"),
                                  lambda o: o.momentum_encoder),
    "msn": _objective_teacher("msn", (
        "model.img_size=32", "model.patch_size=4", "model.depth=1", "objective.focal_views=2",
        "objective.focal_size=16", "objective.proj_hidden=16", "objective.proj_dim=8",
        "objective.num_prototypes=6"), lambda o: o.target),
    # composite [moco_v3, simmim]: simmim adds a mask token to the shared backbone after moco_v3 copied it into
    # its momentum encoder; the EMA still pairs every teacher tensor with the student's of the same name
    "composite": _objective_teacher("composite", ("objective.parts=[{name: moco_v3, weight: 0.5}, "
                                                  "{name: simmim, weight: 0.5}]",),
                                    lambda o: next(iter(o.teachers().values()))),
}


@pytest.mark.parametrize("name", sorted(EMA_TEACHERS))
def test_ema_teacher_follows_the_formula_and_never_gets_gradients(name) -> None:
    """m * teacher + (1 - m) * student for every trainable student parameter (and floating buffer, with
    ``include_buffers``), in the update's floating-point order; frozen student parameters and integer buffers
    (``num_batches_tracked``) are copied; tensors are paired by name; the teacher shares nothing with the student,
    has no gradients, and runs in eval mode."""
    teacher = EMA_TEACHERS[name]()
    student = teacher.student
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in [*student.parameters(), *(student.buffers() if teacher.include_buffers else ())]:
            if tensor.is_floating_point():
                tensor.add_(1.0 + 0.1 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.add_(3)
    module = teacher.module
    before = {key: value.clone() for key, value in [*module.named_parameters(), *module.named_buffers()]}
    m = teacher.update(3, 10)
    assert m == teacher.momentum(3, 10) and 0.0 < m < 1.0
    params, buffers = dict(student.named_parameters()), dict(student.named_buffers())
    if name == "composite":
        assert any(key.endswith("mask_token") for key in params)
        assert not any(key.endswith("mask_token") for key, _ in teacher.module.named_parameters())
    for key, new in teacher.module.named_parameters():
        source = params[key].detach()
        want = before[key].mul(m).add_(source, alpha=1 - m) if params[key].requires_grad else source
        assert torch.equal(new, want), key
        assert not new.requires_grad and new.grad is None, key
    if teacher.include_buffers:
        for key, new in teacher.module.named_buffers():
            want = before[key].mul(m).add_(buffers[key], alpha=1 - m) if new.is_floating_point() else buffers[key]
            assert torch.equal(new, want), key
        assert any(key.endswith("running_mean") for key in buffers)
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
    if name == "buffers":
        torch.testing.assert_close(teacher.module[1].running_mean, before["1.running_mean"] * 0.5
                                   + student[1].running_mean * 0.5)
        out = teacher(torch.randn(3, 4))
        assert not out.requires_grad and not teacher.module.training


class _Frozen(Objective):
    """An objective around a frozen teacher (the pre-platform fixture's encoder)."""

    def __init__(self, encoder, params) -> None:
        super().__init__(encoder, params)
        self.head = nn.Linear(encoder.embed_dim, encoder.embed_dim)
        self.reference = FrozenTeacher.from_checkpoint(PRE_PLATFORM_CHECKPOINT)

    def loss(self, batch, outputs, ctx):
        target = self.reference(batch["image"]).cls
        return ObjectiveOutput(loss=(self.head(self.encoder(batch["image"]).cls) - target).pow(2).mean())


def test_frozen_teacher_stays_out_of_optimizer_and_checkpoint_and_runs_in_eval_mode() -> None:
    config = load_config(None)
    objective = _Frozen(build_encoder(config.model), None)
    teacher = objective.teachers()["reference"]
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimised = {id(p) for group in objective.param_groups(0.05) for p in group["params"]}
    assert teacher_ids and not teacher_ids & optimised
    assert not any(key.startswith("reference") for key in objective.state_dict())
    assert teacher.sha256 and teacher.source.endswith("checkpoint_step2") and not teacher.persistent
    objective.train()
    loss = objective({"image": torch.randn(2, 3, 16, 16)}, _ctx()).loss
    loss.backward()
    assert not teacher.module.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_param_groups_follow_no_weight_decay_and_specs() -> None:
    objective, config = _mae()
    groups = objective.param_groups(0.05)
    names = {id(p): n for n, p in objective.named_parameters()}
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert "encoder.vit.cls_token" in undecayed and "encoder.vit.blocks.0.attn.qkv.bias" in undecayed
    assert "encoder.vit.blocks.0.attn.qkv.weight" not in undecayed
    assert {f"encoder.{name}" for name in objective.encoder.no_weight_decay()} <= objective.no_weight_decay()
    objective.param_group_specs = lambda: [ParamGroupSpec("decoder", lr_scale=0.1, weight_decay=0.5, max_grad_norm=1.0)]
    optimizer = build_optimizer(objective, config, world_size=1)
    assert isinstance(optimizer, GroupClippedAdamW)
    decoder = [g for g in optimizer.param_groups if g["max_grad_norm"] == 1.0]
    assert {g["weight_decay"] for g in decoder} == {0.5, 0.0}
    assert all(g["lr"] == pytest.approx(0.1 * config.learning_rate()) for g in decoder)


def test_group_clipping_bounds_the_group_norm() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    optimizer = GroupClippedAdamW([{"params": [a], "max_grad_norm": 1.0}, {"params": [b], "max_grad_norm": None}])
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([3.0, 4.0, 0.0])
    optimizer.clip_groups()
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert b.grad.norm().item() == pytest.approx(5.0)


def test_rank_generators_differ_per_rank_and_restore_exactly() -> None:
    first, second = RankRandomness(0, 0), RankRandomness(0, 1)
    assert not torch.equal(torch.rand(4, generator=first.generator), torch.rand(4, generator=second.generator))
    state = first.state_dict()
    expected = (torch.rand(4, generator=first.generator), torch.rand(4))
    again = RankRandomness(0, 0)
    again.load_state_dict(state)
    assert torch.equal(torch.rand(4, generator=again.generator), expected[0])
    assert torch.equal(torch.rand(4), expected[1])
    ctx = StepContext(step=3, total_steps=10, rank=1, seed=7)
    draw = torch.rand(3, generator=ctx.step_generator("morph"))
    assert torch.equal(draw, torch.rand(3, generator=StepContext(3, 99, rank=1, seed=7).step_generator("morph")))
    assert not torch.equal(draw, torch.rand(3, generator=StepContext(4, 10, rank=1, seed=7).step_generator("morph")))
    assert derived_seed(0, 1) != derived_seed(1, 0)


def test_collectives_are_identities_in_one_process() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
    torch.testing.assert_close(all_reduce_mean(x), x.detach())


def test_to_device_moves_nested_batches() -> None:
    batch = {"views": [torch.zeros(2, 3), torch.ones(2, 3)], "mask": torch.zeros(2, dtype=torch.int64), "key": ["a"]}
    moved = to_device(batch, torch.device("cpu"), torch.float64)
    assert [v.dtype for v in moved["views"]] == [torch.float64] * 2
    assert moved["mask"].dtype == torch.int64 and moved["key"] == ["a"]


# --- a DeepSpeed engine inside the test process (gloo, world size 1) -----------------------------------------------
def _twoview(*overrides: str):
    config = load_config(None, [
        "objective.name=twoview_ema", "optim.grad_accum=2", "data.batch_size=4", "train.steps=10",
        "optim.warmup_steps=1", *overrides,
    ])
    torch.manual_seed(0)
    objective = build_objective(config.objective.name, config.objective.params, build_encoder(config.model))
    return objective, config


def _batches(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        views = [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
        yield {"views": views, "key": [str(i) for i in range(4)], "label": torch.zeros(4, dtype=torch.int64)}


@pytest.mark.parametrize("stage", [2, 3])
def test_ema_teacher_updates_once_per_optimizer_step_under_accumulation(process_group, stage) -> None:
    objective, config = _twoview(f"train.zero_stage={stage}")
    engine = build_engine(objective, config, world_size=1, bf16=False)
    teacher = objective.teachers()["teacher"]
    expected = [p.detach().clone() for p in teacher.module.parameters()]
    randomness = RankRandomness(0, 0)
    batches = _batches()
    for step in range(3):
        ctx = StepContext(step, config.train.steps, generator=randomness.generator)
        record = optimizer_step(engine, objective, batches, ctx, config.optim.grad_accum, torch.device("cpu"),
                                torch.float32)
        m = cosine_schedule(step, config.train.steps, 0.9, 1.0)
        assert record.metrics["momentum/teacher"] == pytest.approx(m)
        with torch.no_grad(), _gathered(objective.encoder):
            students = [p.detach().clone() for p in objective.encoder.parameters()]
        # the formula, in the same floating-point order as the update: m * teacher + (1 - m) * student; frozen
        # student parameters (the sin-cos position embedding) are copied
        trained = [p.requires_grad for p in objective.encoder.parameters()]
        assert not all(trained)
        expected = [old.mul(m).add_(new, alpha=1 - m) if grad else new
                    for old, new, grad in zip(expected, students, trained, strict=True)]
        for want, have in zip(expected, teacher.module.parameters(), strict=True):
            assert torch.equal(have, want)
            assert have.grad is None
    assert int(objective.seen) == 3 * 2 * 4


def _gathered(module):
    from maskray.distributed import gathered

    return gathered(module.parameters())


def _twoview_round_trip():
    objective, config = _twoview("train.zero_stage=2")
    return objective, config, _batches()


def _mae_lut_round_trip():
    config = load_config(None, ["objective.name=mae_lut", "objective.head_dim=64", "data.batch_size=4",
                                "train.steps=10", "optim.warmup_steps=1", "train.zero_stage=2"])
    torch.manual_seed(0)
    objective = build_objective(config.objective.name, config.objective.params, build_encoder(config.model))

    def batches():
        generator = torch.Generator().manual_seed(0)
        while True:
            yield {"image": torch.randn(4, 3, 16, 16, generator=generator),
                   "augmented": torch.randn(4, 3, 16, 16, generator=generator),
                   "key": [str(i) for i in range(4)], "label": torch.zeros(4, dtype=torch.int64)}

    return objective, config, batches()


def _vqkd_round_trip():
    from helpers import demo_digits, tiny_vqkd

    config = load_config(None, ["model.img_size=16", "data.batch_size=8", "train.steps=10", "optim.warmup_steps=1",
                                "train.zero_stage=2"])
    pixels = demo_digits(16, 8)

    def batches():
        while True:
            yield {"crop": [(pixels - 0.5) / 0.5, pixels], "key": [str(i) for i in range(8)],
                   "label": torch.zeros(8, dtype=torch.int64)}

    return tiny_vqkd(restart_after=1), config, batches()


# objective -> (objective, config, batch stream), built afresh: a DeepSpeed run of it that saves its training state
ROUND_TRIPS = {"twoview_ema": _twoview_round_trip, "mae_lut": _mae_lut_round_trip, "vqkd": _vqkd_round_trip}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_training_state_round_trip_is_bit_exact(process_group, tmp_path, one_thread, name) -> None:
    """Two DeepSpeed steps (ZeRO-2), save, load into a fresh objective and engine: the step and run name, every
    teacher (EMA weights and batch-norm statistics), the objective's extra state (twoview_ema's counter), its whole
    state dict (heads, batch-norm statistics, VQ-KD's codebook, k-means flag and idle counters) and the rank's
    generator come back bit for bit, and the next step on the same micro-batch gives the same loss, metrics,
    teachers and state on both."""
    objective, config, batches = ROUND_TRIPS[name]()
    accum = config.optim.grad_accum
    engine = build_engine(objective, config, world_size=1, bf16=False)
    randomness = RankRandomness(0, 0)

    def step(engine, objective, batches, randomness, index):
        ctx = StepContext(index, 10, generator=randomness.generator)
        return optimizer_step(engine, objective, batches, ctx, accum, torch.device("cpu"), torch.float32)

    for index in range(2):
        record = step(engine, objective, batches, randomness, index)
    if name == "mae_lut":
        assert record.metrics["momentum/teacher"] == pytest.approx(cosine_schedule(1, 10, 0.996, 1.0))
    save_training_state(engine, objective, randomness, str(tmp_path), 2, "run", 0, None, config)
    teachers = {key: {k: v.clone() for k, v in t.state_dict().items()} for key, t in objective.teachers().items()}
    extra = {key: value.clone() for key, value in objective.extra_state().items()}
    draws = torch.rand(5, generator=randomness.generator)

    fresh, _, _ = ROUND_TRIPS[name]()
    fresh_engine = build_engine(fresh, config, world_size=1, bf16=False)
    fresh_randomness = RankRandomness(0, 0)
    assert load_training_state(fresh_engine, fresh, fresh_randomness, str(tmp_path), 0) == (2, "run")
    for key, teacher in fresh.teachers().items():
        assert teacher.state_dict().keys() == teachers[key].keys()
        for k, value in teacher.state_dict().items():
            assert torch.equal(value, teachers[key][k]), (key, k)
    assert fresh.extra_state().keys() == extra.keys()
    for key, value in fresh.extra_state().items():
        assert torch.equal(value, extra[key]), key
    assert torch.equal(torch.rand(5, generator=fresh_randomness.generator), draws)
    for (key, a), (_, b) in zip(fresh.state_dict().items(), objective.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    if name == "vqkd":
        assert bool(fresh.quantizer.initialised) and not torch.equal(fresh.quantizer.codebook, torch.zeros(16, 32))
        for key in ("codebook", "initialised", "idle"):
            assert torch.equal(getattr(fresh.quantizer, key), getattr(objective.quantizer, key)), key
        z = torch.randn(64, 32)  # the next training forward assigns the same codes, updates the codebook alike
        assert torch.equal(fresh.quantizer(z, fresh_randomness.generator).codes,
                           objective.quantizer(z, randomness.generator).codes)
        assert torch.equal(fresh.quantizer.codebook, objective.quantizer.codebook)

    batch = next(batches)  # both continue with the same micro-batches
    after = [step(e, o, iter([batch] * accum), r, 2) for e, o, r in
             ((engine, objective, randomness), (fresh_engine, fresh, fresh_randomness))]
    assert after[0].loss == after[1].loss and after[0].metrics == after[1].metrics
    for (key, teacher), other in zip(objective.teachers().items(), fresh.teachers().values(), strict=True):
        for k, value in teacher.state_dict().items():
            assert torch.equal(other.state_dict()[k], value), (key, k)
    for (key, a), (_, b) in zip(fresh.state_dict().items(), objective.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
