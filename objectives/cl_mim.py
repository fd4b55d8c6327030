"""CL + MIM hybrid: MoCo v3 + SimMIM on one backbone (Park et al. 2023, "What Do Self-Supervised Vision
Transformers Learn?"; spec ``objectives.md`` 8.3, A.8).

``L = (1 - cl_weight) * L_MIM + cl_weight * L_CL`` (the paper's λ is ``cl_weight``: 0 is SimMIM, 1 is MoCo v3).
This is the core ``composite`` of the registered ``simmim`` and ``moco_v3`` objectives with the two weights
derived from the one knob, so λ is set in one place and the weights always sum to 1 (a plain composite would
take two independent weights). Each part's own keys go under ``simmim:`` / ``moco_v3:``, validated by that
objective (errors name ``objective.simmim.<key>``). Metrics: ``simmim/loss`` and ``moco_v3/loss`` unweighted (their
scales differ: 2T * CE terms start near 4T ln B, SimMIM's L1 below 1), plus each part's own.

Views and passes (the composite's union, one backbone pass per distinct (view, mask)): MoCo's two augmented
crops run unmasked (2 passes, plus its momentum encoder on both), and SimMIM masks its **own** mild crop
(``simmim_image``, one replace pass), as A.8's ``hybrid_step(v1, v2, v_mim, mask32, lam)``. Masking MoCo's view 1
instead would save a loader crop but no backbone pass (the masked pass of view 1 is a different (view, mask) from
its unmasked pass), and would make SimMIM reconstruct colour-jittered, blurred, solarised pixels.

The cl-vs-mim repository has no hybrid training code (spec section 11.10): λ's best value is not recoverable;
0.5 is the spec's suggested default. SimMIM is built first, so the shared encoder has its mask token before
MoCo's momentum encoder copies it (the copy's token is unused: keys come from unmasked views).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializeAsAny, ValidationInfo, field_validator

from maskray.composite import Composite, CompositeParams, PartConfig
from maskray.models import MaskedViT
from maskray.objective import ObjectiveParams, context_where, register_objective, validate_objective


class CLMIMParams(ObjectiveParams):
    cl_weight: float = Field(0.5, ge=0.0, le=1.0, description="λ: L = (1 - λ) L_SimMIM + λ L_MoCo")
    simmim: SerializeAsAny[ObjectiveParams] = Field(default_factory=dict, validate_default=True,
                                                    description="keys of the simmim part")
    moco_v3: SerializeAsAny[ObjectiveParams] = Field(default_factory=dict, validate_default=True,
                                                     description="keys of the moco_v3 part")

    @field_validator("simmim", "moco_v3", mode="before")
    @classmethod
    def _typed_part(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, ObjectiveParams):
            return value
        if not isinstance(value, dict):
            return value  # pydantic names the type error
        return validate_objective(info.field_name, value, f"{context_where(info)}.{info.field_name}")

    def composite(self) -> CompositeParams:
        """The equivalent ``composite`` config: simmim weighted 1 - λ, then moco_v3 weighted λ."""
        return CompositeParams(parts=[
            PartConfig(name="simmim", weight=1.0 - self.cl_weight, params=self.simmim),
            PartConfig(name="moco_v3", weight=self.cl_weight, params=self.moco_v3),
        ])


@register_objective("cl_mim")
class CLMIM(Composite):
    Config = CLMIMParams

    def __init__(self, encoder: MaskedViT, params: CLMIMParams) -> None:
        super().__init__(encoder, params.composite())
        self.cl_weight = params.cl_weight

    @classmethod
    def check_config(cls, config: CLMIMParams, where: str) -> None:
        """Nothing beyond the parts' own checks, run as they were validated (errors name ``<where>.simmim.<key>``,
        ``<where>.moco_v3.<key>``); the composite's check of ``eval_part`` does not apply."""

    def check(self, model, data, where: str) -> None:
        for name, part in self.parts.items():
            part.check(model, data, f"{where}.{name}")
