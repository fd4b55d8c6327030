"""``fault_mae``: MAE whose training worker sends itself a signal at given steps, for the fault tests and the
recovery benchmark. Each entry of ``faults`` (``{"step": 0-based optimizer step, "rank": r, "signal": "SIGTERM" |
"SIGKILL", "at": "forward" | "figures"}``; ``figures``: in the final stage, after the last checkpoint, on rank 0,
whatever ``step`` says) fires once per run: its marker ``<marker_dir>/fault<i>`` (the time it fired) keeps the restarted
workers from firing it again. The first forward of a worker process that starts after a fault writes
``<marker_dir>/resumed<i>_rank<r>.json`` (the time, rank and step), so recovery can be timed from kill to first step."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from maskray.context import StepContext
from maskray.objective import register_objective
from objectives.mae import MAE, MAEParams


class Fault(BaseModel):
    step: int
    rank: int
    signal: Literal["SIGTERM", "SIGKILL"] = "SIGKILL"
    at: Literal["forward", "figures"] = "forward"


class FaultMAEParams(MAEParams):
    faults: list[Fault] = []
    marker_dir: str = ""


@register_objective("fault_mae")
class FaultMAE(MAE):
    Config = FaultMAEParams

    def __init__(self, encoder, params: FaultMAEParams) -> None:
        super().__init__(encoder, params)
        self.started = False

    def forward(self, batch: dict[str, Any], ctx: StepContext):
        markers = Path(self.params.marker_dir)
        if not self.started:  # the first step of this process: after which fault, if any
            self.started = True
            fired = sorted(markers.glob("fault*"))
            if fired:
                record = {"time": time.time(), "rank": ctx.rank, "step": ctx.step}
                markers.joinpath(f"resumed{len(fired) - 1}_rank{ctx.rank}.json").write_text(json.dumps(record))
        for index, fault in enumerate(self.params.faults):
            if fault.at == "forward" and fault.step == ctx.step and fault.rank == ctx.rank:
                self._fire(index, fault)
        return super().forward(batch, ctx)

    def figures(self, batch: dict[str, Any]) -> dict[str, Any]:
        for index, fault in enumerate(self.params.faults):
            if fault.at == "figures":
                self._fire(index, fault)
        return super().figures(batch)

    def _fire(self, index: int, fault: Fault) -> None:
        marker = Path(self.params.marker_dir) / f"fault{index}"
        if not marker.exists():
            marker.write_text(str(time.time()))
            os.kill(os.getpid(), getattr(signal, fault.signal))
