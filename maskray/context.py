"""What an objective knows about the step it computes: :class:`StepContext`, and each rank's random generators.

Randomness is per rank and resumable (:class:`RankRandomness`): the model is initialised from ``train.seed`` on
every rank (identical weights), then each rank reseeds torch's global generator (dropout, drop path, loader worker
seeds) and creates its own step generator (masks) from ``(seed, rank)``, so ranks draw different masks. Both
generators' states go into every checkpoint, so a resumed run draws what it would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: different tuples give independent streams)."""
    return int(np.random.SeedSequence([int(part) for part in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class StepContext:
    """step: the optimizer step being computed (0-based; optimizer steps done before it); total_steps: the run's
    length in optimizer steps (``train.steps``; schedules are pure functions of (step, total_steps)); micro_step:
    the micro-batch within gradient accumulation; rank / world_size: this worker; seed: ``train.seed``;
    generator: this rank's step generator on the compute device (draw masks and noise from it)."""

    step: int
    total_steps: int
    rank: int = 0
    world_size: int = 1
    micro_step: int = 0
    seed: int = 0
    generator: torch.Generator | None = None

    def step_generator(self, name: str, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded by (seed, step, rank, name): a pure function of the step, e.g. DTM's per-step
        morphing schedule. Independent of the micro-batch; draw from it once per step."""
        name_code = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
        generator = torch.Generator(device=device)
        generator.manual_seed(derived_seed(self.seed, self.step, self.rank, name_code))
        return generator


class RankRandomness:
    """This rank's generators: torch's global ones (reseeded per rank) and the step generator on ``device``."""

    def __init__(self, seed: int, rank: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        torch.manual_seed(derived_seed(seed, rank, 0))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(derived_seed(seed, rank, 1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"step_generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["step_generator"])
        torch.set_rng_state(state["torch_cpu"])
        if "torch_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["torch_cuda"], self.device)
