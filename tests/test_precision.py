"""``train.precision``: bf16 is a real CPU training mode through DeepSpeed; ``auto`` stays fp32 on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from maskray.config import load_config
from maskray.context import RankRandomness, StepContext
from maskray.engine.deepspeed_setup import build_engine, use_bf16
from maskray.models import MAEDecoder, build_encoder
from maskray.objective import build_objective

CPU = torch.device("cpu")


@pytest.mark.parametrize(("precision", "device", "want"), [
    ("auto", "cpu", False), ("auto", "cuda", True), ("bf16", "cpu", True), ("fp32", "cuda", False),
])
def test_use_bf16_follows_precision_and_device(precision, device, want) -> None:
    config = load_config(None, [f"train.precision={precision}"])
    assert use_bf16(config, torch.device(device)) is want


def test_mae_decoder_in_bf16_keeps_bf16_with_its_fp32_position_table() -> None:
    """DeepSpeed's bf16 mode casts parameters, not buffers: the sin-cos table stays fp32."""
    decoder = MAEDecoder(8, (2, 3), 12, dim=8, depth=1, num_heads=2)
    for parameter in decoder.parameters():
        parameter.data = parameter.data.bfloat16()
    assert decoder.pos_embed.dtype == torch.float32
    ids_restore = torch.stack([torch.randperm(6) for _ in range(2)])
    out = decoder(torch.randn(2, 3, 8, dtype=torch.bfloat16), ids_restore)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 6, 12)


def _train(steps: int, overrides: list[str], batch_size: int = 16, configure=None):
    """The worker's step (``build_engine`` at world size 1 + ``optimizer_step``) for ``steps`` steps on one fixed
    batch of the ``mae`` objective; ``configure(engine)`` runs before the first step. Returns (losses, objective)."""
    from maskray.engine.step import optimizer_step

    config = load_config(None, ["objective.name=mae", f"data.batch_size={batch_size}", f"train.steps={steps}",
                                *overrides])
    torch.manual_seed(0)
    objective = build_objective(config.objective.name, config.objective.params, build_encoder(config.model))
    bf16 = use_bf16(config, CPU)
    engine = build_engine(objective, config, world_size=1, bf16=bf16)
    if configure:
        configure(engine)
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(batch_size, 3, 16, 16, generator=generator),
             "key": [str(i) for i in range(batch_size)], "label": torch.zeros(batch_size, dtype=torch.int64)}
    batches = iter([batch] * steps)  # one fixed batch: the loss must fall
    randomness = RankRandomness(0, 0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    losses = [optimizer_step(engine, objective, batches, StepContext(step, steps, generator=randomness.generator),
                             1, CPU, dtype).loss for step in range(steps)]
    return losses, objective


def _losses(precision: str, steps: int) -> tuple[list[float], torch.dtype]:
    losses, objective = _train(steps, ["optim.lr=2e-3", "optim.warmup_steps=1", "train.zero_stage=2",
                                       f"train.precision={precision}"])
    return losses, next(objective.encoder.parameters()).dtype


def test_bf16_trains_through_deepspeed_on_cpu_like_fp32(process_group) -> None:
    """The worker's step (DeepSpeed ZeRO-2 engine + ``optimizer_step``) in bf16: bf16 parameters, finite losses
    that fall, and a curve within bf16 rounding of fp32's on the same data, weights and masks."""
    steps = 8
    fp32, fp32_dtype = _losses("fp32", steps)
    bf16, bf16_dtype = _losses("bf16", steps)
    assert (fp32_dtype, bf16_dtype) == (torch.float32, torch.bfloat16)
    assert all(math.isfinite(loss) for loss in bf16)
    assert bf16[-1] < 0.8 * bf16[0]
    assert bf16[0] == pytest.approx(fp32[0], rel=0.02)  # same weights and mask: only the rounding differs
    assert sum(bf16[-3:]) == pytest.approx(sum(fp32[-3:]), rel=0.05)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batch_norm_in_one_process_is_batch_norm_and_keeps_fp32_statistics_under_bf16(momentum) -> None:
    from maskray.models import GlobalBatchNorm1d

    torch.manual_seed(0)
    ours, torchs = GlobalBatchNorm1d(6, momentum=momentum), torch.nn.BatchNorm1d(6, momentum=momentum)
    with torch.no_grad():
        for module in (ours, torchs):
            module.weight.copy_(torch.linspace(0.5, 2.0, 6))
            module.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    for _ in range(3):
        x = torch.randn(10, 6) * 3 + 1
        torch.testing.assert_close(ours(x), torchs(x), rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(torchs, name), rtol=0, atol=0)
    ours.eval(), torchs.eval()
    torch.testing.assert_close(ours(x), torchs(x), rtol=0, atol=0)

    ours.train()
    ours.weight.data, ours.bias.data = ours.weight.data.bfloat16(), ours.bias.data.bfloat16()  # as DeepSpeed casts
    before = ours.running_mean.clone()
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32
    assert not torch.equal(ours.running_mean, before)
    torch.testing.assert_close(out.float(), torchs.train()(x), rtol=0.02, atol=0.02)


# --- the step's fast paths against the PyTorch reference ------------------------------------------------------------
def test_mae_loss_on_removed_patch_predictions_equals_the_full_decoder_path() -> None:
    """``MAEDecoder.forward_removed`` + ``masked_patch_loss(ids_restore=)`` (the objective's path) equals the
    reference's all-patch prediction + masked loss: loss and every gradient, in fp64."""
    from maskray.masking import masked_patch_loss, random_mask_indices

    torch.manual_seed(0)
    encoder = build_encoder(load_config(None, []).model).double()
    decoder = MAEDecoder(encoder.embed_dim, encoder.grid_size, 48, dim=32, depth=2, num_heads=4).double()
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    masking = random_mask_indices(torch.rand(3, 16), 4)
    grads = []
    for removed_only in (False, True):
        encoder.zero_grad(), decoder.zero_grad()
        latent = encoder(images, ids_keep=masking.ids_keep).tokens
        if removed_only:
            pred = decoder.forward_removed(latent, masking.ids_restore)
            assert pred.shape == (3, 12, 48)
            loss = masked_patch_loss(pred, images, masking.mask, 4, True, ids_restore=masking.ids_restore)
        else:
            loss = masked_patch_loss(decoder(latent, masking.ids_restore), images, masking.mask, 4, True)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in [*encoder.named_parameters(),
                                                                       *decoder.named_parameters()]
                                      if p.grad is not None}))
    (full, full_grads), (ours, our_grads) = grads
    torch.testing.assert_close(ours, full, rtol=1e-12, atol=0)
    assert our_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_fused_adamw_steps_like_the_for_loop_adamw() -> None:
    from maskray.engine.deepspeed_setup import build_optimizer

    config = load_config(None, ["optim.lr=1e-2", "optim.weight_decay=0.05"])
    torch.manual_seed(0)
    objective = build_objective("mae", {}, build_encoder(config.model))
    optimizer = build_optimizer(objective, config, world_size=1)
    assert all(group["fused"] for group in optimizer.param_groups)
    reference_params = [p.detach().clone().requires_grad_() for p in objective.parameters()]
    reference = torch.optim.AdamW(
        [{**{k: v for k, v in group.items() if k not in ("params", "fused", "foreach")},
          "params": [reference_params[i] for i, p in enumerate(objective.parameters())
                     if any(p is q for q in group["params"])]} for group in optimizer.param_groups],
        foreach=False)
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        for ours, theirs in zip(objective.parameters(), reference_params, strict=True):
            ours.grad = torch.randn(ours.shape, generator=generator)
            theirs.grad = ours.grad.clone()
        optimizer.step(), reference.step()
    for ours, theirs in zip(objective.parameters(), reference_params, strict=True):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)


def test_explicit_attention_gives_the_fused_loss_and_gradients() -> None:
    """The form a CPU bf16 engine switches to (``set_fused_attention(False)``) against torch's SDPA, fp64."""
    from maskray.models import set_fused_attention

    torch.manual_seed(0)
    config = load_config(None, ["objective.name=mae"])
    objective = build_objective("mae", config.objective.params, build_encoder(config.model)).double()
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    results = []
    for fused in (True, False):
        assert set_fused_attention(objective, fused) == 4 + 2  # encoder and decoder blocks
        objective.zero_grad()
        out = objective({"image": images}, StepContext(0, 1, generator=torch.Generator().manual_seed(1)))
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in objective.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=0)
    for ours, theirs in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_a_bf16_cpu_engine_uses_explicit_attention(process_group) -> None:
    config = load_config(None, ["objective.name=mae", "train.zero_stage=2"])
    for bf16 in (False, True):
        objective = build_objective("mae", config.objective.params, build_encoder(config.model))
        build_engine(objective, config, world_size=1, bf16=bf16)
        flags = {m.fused_attn for m in objective.modules() if hasattr(m, "fused_attn")}
        assert flags == {not bf16}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_one_worker_zero0_engine_skips_the_all_reduce_and_steps_the_same(process_group, precision) -> None:
    """World size 1, ZeRO stage auto (0): DeepSpeed's gradient all-reduce is off and the weights after three
    steps equal those of the same engine with it on."""
    overrides = ["optim.lr=1e-2", "optim.warmup_steps=0", "optim.clip_grad=1.0", f"train.precision={precision}"]

    def all_reduce(on: bool):
        def configure(engine) -> None:
            assert engine.zero_optimization_stage() == 0 and engine.enable_backward_allreduce is False
            engine.enable_backward_allreduce = on
        return configure

    weights = []
    for on in (False, True):
        _, objective = _train(3, overrides, batch_size=4, configure=all_reduce(on))
        weights.append([p.detach().float().clone() for p in objective.parameters()])
    for ours, reference in zip(*weights, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
