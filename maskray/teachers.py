"""Teachers: networks an objective learns from that the optimizer never touches.

Both kinds are plain objects, not ``nn.Module`` attributes of the objective, so DeepSpeed neither optimises,
partitions, casts to bf16 nor checkpoints them with the student; the engine moves them to the device and the
training state saves what must be saved:

- :class:`EMATeacher`: an fp32 copy of student modules, updated ``θ_t <- m θ_t + (1 - m) θ_s`` once per optimizer
  step (never per micro-batch) with a momentum schedule ``m(step, total_steps)`` (frozen student parameters are
  copied); optionally floating buffers too (LUT averages BatchNorm statistics). Under ZeRO-3 the partitioned
  student is gathered for the update. Saved in every checkpoint (``objective_state.pt``).
- :class:`FrozenTeacher`: a fixed network (built from a file or an earlier run, :mod:`maskray.teacher_sources`), in
  eval mode, in the precision it asks for; rebuilt from its source on resume, never saved. Its ``source`` and
  weights' ``sha256`` are recorded; ``mean`` / ``std`` are the input normalisation it expects.

Calling a teacher runs its module under ``no_grad`` in eval mode (with ``batch_stats``, its batch norms in train
mode: they normalise with the statistics of the batch, as MoCo v3's momentum encoder does); with bf16 inputs an
fp32 teacher computes under bf16 autocast.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from maskray.distributed import gathered
from maskray.models.pretrained import file_sha256

Momentum = Callable[[int, int], float]


class Teacher:
    """Base: ``module`` runs under no_grad in eval mode (batch norms in train mode if ``batch_stats``);
    ``persistent`` teachers are saved in checkpoints."""

    persistent = False

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32, batch_stats: bool = False) -> None:
        self.module = module.to(dtype).eval().requires_grad_(False)
        self.dtype = dtype
        self.batch_stats = batch_stats

    def to(self, device: torch.device | str) -> Teacher:
        self.module.to(device)
        return self

    def parameters(self):
        return self.module.parameters()

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.module.eval()
        if self.batch_stats:
            for module in self.module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
        values = (*args, *kwargs.values())
        tensors = [value for value in values if isinstance(value, torch.Tensor) and value.is_floating_point()]
        autocast = bool(tensors) and tensors[0].dtype == torch.bfloat16 and self.dtype == torch.float32
        device_type = tensors[0].device.type if tensors else "cpu"
        if not autocast:
            args = tuple(_cast(arg, self.dtype) for arg in args)
            kwargs = {key: _cast(value, self.dtype) for key, value in kwargs.items()}
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            return self.module(*args, **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().clone() for key, value in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


class EMATeacher(Teacher):
    """An exponential moving average of ``student`` (kept in fp32).

    Args:
        student: the student module to follow, a submodule of the objective. Build the teacher in the objective's
            ``__init__``, before DeepSpeed wraps (and under ZeRO-3 partitions) the student.
        momentum: ``m(step, total_steps)`` for the update after optimizer step ``step`` (0-based), e.g.
            ``functools.partial(maskray.schedules.cosine_schedule, start=0.996, end=1.0)``.
        include_buffers: average floating buffers too (integer buffers such as ``num_batches_tracked`` are copied).
        batch_stats: the teacher's batch norms normalise with the batch's statistics (MoCo v3's momentum
            encoder runs in train mode); its running statistics then follow its own batches.

    Teacher and student tensors are paired by name. A parameter added to the student after the teacher was built
    (a mask token that a later part of a composite adds to the shared backbone) is not followed: the teacher was
    copied without it and never reads it.
    """

    persistent = True

    def __init__(
        self, student: nn.Module, momentum: Momentum, include_buffers: bool = False, batch_stats: bool = False
    ) -> None:
        super().__init__(copy.deepcopy(student), torch.float32, batch_stats)
        self.student = student  # a reference (a Teacher is no nn.Module, so nothing is registered)
        self.momentum = momentum
        self.include_buffers = include_buffers
        self.last_momentum = float("nan")

    @torch.no_grad()
    def update(self, step: int, total_steps: int) -> float:
        """Apply one EMA step for optimizer step ``step``; returns the momentum used. Collective under ZeRO-3."""
        m = float(self.momentum(step, total_steps))
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {m} at step {step}")
        student_params = dict(self.student.named_parameters())
        with gathered(list(student_params.values())):
            for name, target in self.module.named_parameters():
                source = self._source(student_params, name)
                if source.requires_grad:
                    target.mul_(m).add_(source.detach().to(target.dtype), alpha=1.0 - m)
                else:  # a frozen student parameter (fixed position embedding, MoCo v3's patch projection)
                    target.copy_(source.detach())  # stays exactly equal instead of drifting by rounding
        if self.include_buffers:
            student_buffers = dict(self.student.named_buffers())
            for name, target in self.module.named_buffers():
                source = self._source(student_buffers, name)
                if target.is_floating_point():
                    target.mul_(m).add_(source.to(target.dtype), alpha=1.0 - m)
                else:
                    target.copy_(source)
        self.last_momentum = m
        return m

    @staticmethod
    def _source(student: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        try:
            return student[name]
        except KeyError:
            raise RuntimeError(f"EMA teacher: the student has no tensor '{name}' any more") from None


class FrozenTeacher(Teacher):
    """A fixed network. ``source`` says where it came from (a path or run id), ``sha256`` its weights' hash,
    ``mean`` / ``std`` the per-channel normalisation of its inputs (None: not known), ``spec`` the config
    (:class:`~maskray.teacher_sources.TeacherSpec`) it was built from, if any."""

    def __init__(
        self,
        module: nn.Module,
        dtype: torch.dtype = torch.float32,
        source: str = "",
        sha256: str = "",
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        spec: Any = None,
    ) -> None:
        super().__init__(module, dtype)
        self.source, self.sha256 = source, sha256
        self.mean, self.std = mean, std
        self.spec = spec

    @classmethod
    def from_checkpoint(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> FrozenTeacher:
        """The encoder of a maskray checkpoint directory (``encoder.safetensors`` + ``model.json``; a local path or
        a filesystem URI), normalised as its run's data."""
        from maskray import storage
        from maskray.checkpoint import ENCODER_FILE, load_encoder
        from maskray.data.transforms import channel_stats

        encoder, config = load_encoder(directory)
        location = storage.absolute(directory)
        mean, std = channel_stats(config.data.mean, config.data.std, config.model.in_chans)
        return cls(encoder, dtype, source=location, sha256=file_sha256(storage.join(location, ENCODER_FILE)),
                   mean=mean, std=std)
