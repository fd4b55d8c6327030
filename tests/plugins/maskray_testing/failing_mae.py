"""``failing_mae``: MAE that raises on a training worker when ``objective.fail`` is true (never in a driver, which
builds the objective for the run specification), for the sweep test that a failing trial does not stop the
others."""

from __future__ import annotations

from maskray.models import MaskedViT
from maskray.objective import register_objective
from maskray_testing import on_a_training_worker
from objectives.mae import MAE, MAEParams


class FailingMAEParams(MAEParams):
    fail: bool = False


@register_objective("failing_mae")
class FailingMAE(MAE):
    Config = FailingMAEParams

    def __init__(self, encoder: MaskedViT, params: FailingMAEParams) -> None:
        if params.fail and on_a_training_worker():
            raise RuntimeError("failing_mae: objective.fail is set")
        super().__init__(encoder, params)
