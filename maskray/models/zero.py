"""DeepSpeed ZeRO-3 support: register the parameters a module reads outside their owner's forward.

ZeRO-3 partitions every parameter and gathers one around the forward and backward of a module that owns it or
that registered it with ``deepspeed.zero.register_external_parameter``; elsewhere it is an empty tensor.
:class:`~maskray.models.MaskedViT` reads the patch projection, CLS token and position embedding in its own forward
(the fused embedding), so they are its external parameters. DeepSpeed 0.19 also discovers such reads by itself,
but only inside ``engine.forward`` (``ZeROOrderedDict.__getitem__`` while ``_in_forward``); registering them
up front does not depend on that heuristic. The backward gather needs the module's output tensors to be visible
to DeepSpeed (tensors, tuples, dicts): with a dataclass output the first backward failed with "The size of tensor
a (0) must match the size of tensor b (192)", hence :class:`~maskray.models.EncoderOutput` is a named tuple.
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
    Call it before ``initialize`` (DeepSpeed's own example registers at model construction; it is what
    ``tests/test_backbone.py`` checks: the registration survives ``initialize`` and stage 3 matches stage 0).
    Idempotent (keyed by parameter id); harmless without ZeRO-3.
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
