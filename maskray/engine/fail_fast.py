"""Fail fast: a user error on any worker stops the whole run at once, with no restart.

A :class:`~maskray.errors.MaskrayError` (a bad config key, data that would fail the same way on every attempt)
raised on one rank is not worth Ray Train's retries (``scaling.max_failures``), and a rank that simply raised
would leave the others waiting in their next collective. So the loop runs each stage that can raise one inside
:func:`failing_together`: the error is caught, and at the end of the stage every rank takes part in one
all-reduce (:func:`agree`) that tells all of them whether any rank failed; if one did, every rank raises
:class:`RunFailed` carrying the lowest failing rank's error, and the training function returns it to the driver,
which re-raises it as the one-line error with exit code 2. Anything else (a lost worker, a killed process, an
I/O error that may pass) still propagates and counts against ``scaling.max_failures``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from maskray.errors import MaskrayError


class RunFailed(Exception):
    """Raised on every rank at once when any rank hit ``error`` in the same stage."""

    def __init__(self, error: MaskrayError) -> None:
        super().__init__(str(error))
        self.error = error


def one_line(error: MaskrayError) -> MaskrayError:
    """``error`` with a one-line message. An error raised in a loader process arrives re-wrapped by PyTorch
    (``Caught DataError in DataLoader worker process 0. Original Traceback ...``): its last line is the original
    ``module.Class: message``."""
    text = str(error)
    if "\n" not in text:
        return error
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return type(error)(last.removeprefix(prefix).strip())


def agree(error: MaskrayError | None, device: torch.device) -> None:
    """Collective (every rank calls it at the same point): raise :class:`RunFailed` on every rank when any rank
    passes an error (the lowest failing rank's); return when none does."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0.0 if error is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return
        errors: list[MaskrayError | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else one_line(error))
        raise RunFailed(next(found for found in errors if found is not None))
    if error is not None:
        raise RunFailed(one_line(error))


@contextmanager
def failing_together(device: torch.device) -> Iterator[None]:
    """Run the block; then :func:`agree` on whether a rank raised a MaskrayError in it (collective). The block
    must itself run no collective after the point where it may raise."""
    error = None
    try:
        yield
    except MaskrayError as caught:
        error = caught
    agree(error, device)
