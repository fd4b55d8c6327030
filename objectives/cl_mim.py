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

from pydantic import Field

from maskray.composite import Composite, CompositeParams, PartConfig
from maskray.models import MaskedViT
from maskray.objective import ObjectiveParams, objective_teacher_specs, register_objective, validate_objective
from maskray.teacher_sources import TeacherSpec


class CLMIMParams(ObjectiveParams):
    cl_weight: float = Field(0.5, ge=0.0, le=1.0, description="λ: L = (1 - λ) L_SimMIM + λ L_MoCo")
    simmim: dict[str, Any] = Field(default_factory=dict, description="keys of the simmim part")
    moco_v3: dict[str, Any] = Field(default_factory=dict, description="keys of the moco_v3 part")

    def composite(self) -> CompositeParams:
        """The equivalent ``composite`` config: simmim weighted 1 - λ, then moco_v3 weighted λ."""
        return CompositeParams(parts=[
            PartConfig(name="simmim", weight=1.0 - self.cl_weight, **self.simmim),
            PartConfig(name="moco_v3", weight=self.cl_weight, **self.moco_v3),
        ])


@register_objective("cl_mim")
class CLMIM(Composite):
    Config = CLMIMParams

    def __init__(self, encoder: MaskedViT, params: CLMIMParams) -> None:
        super().__init__(encoder, params.composite())
        self.cl_weight = params.cl_weight

    @classmethod
    def teacher_specs(cls, config: CLMIMParams, where: str) -> dict[str, TeacherSpec]:
        """Each part's frozen teachers, keyed under ``<where>.simmim`` / ``<where>.moco_v3``."""
        return {key: spec for name in ("simmim", "moco_v3")
                for key, spec in objective_teacher_specs(name, getattr(config, name), f"{where}.{name}").items()}

    @classmethod
    def check_config(cls, config: CLMIMParams, where: str) -> None:
        validate_objective("simmim", config.simmim, where=f"{where}.simmim")
        validate_objective("moco_v3", config.moco_v3, where=f"{where}.moco_v3")
