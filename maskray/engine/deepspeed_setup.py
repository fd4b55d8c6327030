"""DeepSpeed configuration and engine construction for one Ray Train worker."""

from __future__ import annotations

from typing import Any

import torch

from maskray.config import Config
from maskray.engine.schedule import warmup_cosine
from maskray.objective import Objective


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
        "zero_optimization": {"stage": config.train.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if config.optim.clip_grad > 0:
        ds["gradient_clipping"] = config.optim.clip_grad
    return ds


def build_engine(objective: Objective, config: Config, world_size: int, bf16: bool):
    """Wrap ``objective`` in a DeepSpeed engine with a torch AdamW and the warmup-cosine schedule.

    The schedule is a ``LambdaLR`` so DeepSpeed steps it at every optimizer step and saves it in the
    checkpoint. Returns the engine.
    """
    import deepspeed

    base_lr = config.learning_rate()
    optimizer = torch.optim.AdamW(
        objective.param_groups(config.optim.weight_decay), lr=base_lr, betas=config.optim.betas
    )

    def multiplier(step: int) -> float:
        return warmup_cosine(
            step, base_lr, config.train.steps, config.optim.warmup_steps, config.optim.min_lr
        ) / base_lr

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, world_size, bf16),
    )
    return engine


def encoder_state(engine, objective: Objective) -> dict[str, torch.Tensor]:
    """The encoder's timm state dict in fp32 on CPU. Collective under ZeRO-3: call it on every rank."""
    import deepspeed

    params = list(objective.encoder.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = objective.encoder.timm_state_dict()
    else:
        state = objective.encoder.timm_state_dict()
    return {key: value.float() for key, value in state.items()}
