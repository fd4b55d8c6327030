"""DeepSpeed configuration and engine construction for one Ray Train worker."""

from __future__ import annotations

from typing import Any

import torch

from maskray.config import Config, zero_stage
from maskray.distributed import gathered
from maskray.engine.optimizer import GroupClippedAdamW
from maskray.models import set_fused_attention
from maskray.objective import Objective
from maskray.schedules import warmup_cosine


def use_bf16(config: Config, device: torch.device) -> bool:
    """bf16 on GPU, fp32 on CPU, unless ``train.precision`` says otherwise."""
    if config.train.precision == "auto":
        return device.type == "cuda"
    return config.train.precision == "bf16"


def deepspeed_config(config: Config, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config: batch sizes, ZeRO stage, precision, clipping."""
    micro, accum = config.data.batch_size, config.optim.grad_accum
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "zero_optimization": {"stage": zero_stage(config.train, world_size)},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if config.optim.clip_grad > 0:
        ds["gradient_clipping"] = config.optim.clip_grad
    return ds


def build_optimizer(objective: Objective, config: Config, world_size: int) -> torch.optim.Optimizer:
    """AdamW over the objective's parameter groups, each at ``lr * lr_scale``; a :class:`GroupClippedAdamW` when a
    group sets ``max_grad_norm`` (its norms summed over the ranks' shards when ``world_size`` workers partition it
    under ZeRO). torch's fused AdamW kernel (one pass over each tensor instead of one per
    elementwise op; the same update as the for-loop form within rounding)."""
    base_lr = config.learning_rate()
    groups = []
    for group in objective.param_groups(config.optim.weight_decay):
        group = dict(group)
        group["lr"] = base_lr * group.pop("lr_scale")
        groups.append(group)
    if any(group["max_grad_norm"] is not None for group in groups):
        return GroupClippedAdamW(groups, partitioned=zero_stage(config.train, world_size) > 0, lr=base_lr,
                                 betas=config.optim.betas, fused=True)
    return torch.optim.AdamW(groups, lr=base_lr, betas=config.optim.betas, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up cosine schedule (:func:`~maskray.schedules.warmup_cosine`) as a ``LambdaLR`` over every group's
    own learning rate, stepped once per optimizer step."""
    base_lr = config.learning_rate()

    def multiplier(step: int) -> float:
        return warmup_cosine(
            step, base_lr, config.train.steps, config.optim.warmup_steps, config.optim.min_lr
        ) / base_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def build_engine(objective: Objective, config: Config, world_size: int, bf16: bool):
    """Wrap ``objective`` in a DeepSpeed engine with its optimizer and the warmup-cosine schedule.

    The schedule is a ``LambdaLR`` so DeepSpeed steps it at every optimizer step and saves it in the
    checkpoint. A one-worker ZeRO-0 engine skips DeepSpeed's gradient all-reduce, which would flatten every
    gradient into one bucket (a second copy of them all), reduce it over the single rank and copy it back. Under
    ZeRO-3 the parameters that modules read outside their owners' forward are registered as external parameters
    first. bf16 on a CPU engine runs attention in timm's explicit form (CPU flash-attention backward is slow in
    bf16, :func:`~maskray.models.set_fused_attention`). Returns the engine.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if bf16 and get_accelerator().device_name() == "cpu":
        set_fused_attention(objective, False)

    stage = zero_stage(config.train, world_size)
    if stage == 3:
        from maskray.models.zero import register_external_parameters

        register_external_parameters(objective)
    optimizer = build_optimizer(objective, config, world_size)
    scheduler = build_scheduler(optimizer, config)
    ds_config = deepspeed_config(config, world_size, bf16)
    if isinstance(optimizer, GroupClippedAdamW):  # ZeRO accepts other optimizer types only when told to
        ds_config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(
        model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if world_size == 1 and stage == 0:
        engine.enable_backward_allreduce = False  # an all-reduce over one rank changes nothing
    return engine


def encoder_state(objective: Objective) -> dict[str, torch.Tensor]:
    """The evaluation encoder's timm state dict in fp32 on CPU. Collective under ZeRO-3: call it on every rank."""
    encoder = objective.eval_encoder()
    with gathered(encoder.parameters()):
        state = encoder.timm_state_dict()
    return {key: value.float() for key, value in state.items()}
