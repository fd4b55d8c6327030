"""DeepSpeed ZeRO-3 support: register the parameters a module reads outside their owner's forward.

ZeRO-3 partitions every parameter and gathers one only around the forward (and backward) of a module that owns
it, or that registered it with ``deepspeed.zero.register_external_parameter``. A parameter read elsewhere is an
empty tensor there; for :class:`~maskray.models.MaskedViT` that is the patch projection, CLS token and position
embedding read by the fused embedding (the failure shows on the first backward: "The size of tensor a (0) must
match the size of tensor b (192)").
"""

from __future__ import annotations

import torch.nn as nn


def register_external_parameters(root: nn.Module) -> int:
    """Register, for every module under ``root`` (itself included) that has an ``external_parameters()``
    method, each parameter it returns as an external parameter of that module. Returns how many were registered.

    Call it on the model passed to ``deepspeed.initialize``; before or after ``initialize`` both work in DeepSpeed
    0.19: registration only records the parameter in ``module._external_params`` (created on demand), which
    ``DeepSpeedZeRoOffload`` keeps (its ``_init_external_params`` does nothing where that dict exists) and which
    the parameter coordinator reads at every fetch (``iter_params`` chains ``ds_external_parameters()``).
    Registering before ``initialize`` is the documented place (at model construction) and is what
    ``tests/test_backbone.py`` exercises. Idempotent (keyed by parameter id); harmless without ZeRO-3.
    """
    import deepspeed

    count = 0
    for module in root.modules():
        external = getattr(module, "external_parameters", None)
        if not callable(external):
            continue
        for param in external():
            deepspeed.zero.register_external_parameter(module, param)
            count += 1
    return count
