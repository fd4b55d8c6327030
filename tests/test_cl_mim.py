"""cl_mim: the MoCo v3 + SimMIM hybrid weights its parts (1 - λ, λ) from one knob and shares the backbone passes."""

from __future__ import annotations

import pytest
import torch

from maskray.config import load_config
from maskray.context import StepContext
from maskray.errors import ConfigError
from maskray.models import build_encoder
from maskray.objective import build_objective, validate_objective


def hybrid(cl_weight: float):
    torch.manual_seed(0)
    config = load_config(None, ["model.img_size=32", "objective.name=cl_mim", f"objective.cl_weight={cl_weight}",
                                "objective.moco_v3.mlp_dim=64", "objective.moco_v3.out_dim=16"])
    return config, build_objective("cl_mim", config.objective.params, build_encoder(config.model))


@pytest.mark.parametrize("cl_weight", [0.0, 0.25, 1.0])
def test_loss_is_one_minus_lambda_mim_plus_lambda_cl(cl_weight) -> None:
    config, objective = hybrid(cl_weight)
    assert objective.weights == {"simmim": 1.0 - cl_weight, "moco_v3": cl_weight}
    views = objective.inputs(config.model, config.data)
    mask = views.entries["simmim_mask"]
    batch = {"simmim_image": torch.randn(4, 3, 32, 32), "simmim_mask": torch.stack([mask(None) for _ in range(4)]),
             "moco_views": [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]}
    out = objective(batch, StepContext(0, 10))
    expected = (1 - cl_weight) * out.metrics["simmim/loss"] + cl_weight * out.metrics["moco_v3/loss"]
    torch.testing.assert_close(out.loss.detach(), expected)


def test_three_distinct_backbone_passes_over_the_union_of_views() -> None:
    config, objective = hybrid(0.5)
    assert sorted(objective.inputs(config.model, config.data).entries) == ["moco_views", "simmim_image", "simmim_mask"]
    keys = {spec.key for spec in objective.passes().values()}
    assert {view for view, _ in keys} == {"simmim_image", "moco_views.0", "moco_views.1"}
    assert [mask.mode for _, mask in keys if mask is not None] == ["replace"]


def test_part_keys_are_validated_by_their_objective() -> None:
    with pytest.raises(ConfigError, match="objective.simmim.mask_ratio"):
        validate_objective("cl_mim", {"simmim": {"mask_ratio": 1.5}})
    with pytest.raises(ConfigError, match="objective.moco_v3.nope"):
        validate_objective("cl_mim", {"moco_v3": {"nope": 1}})
    with pytest.raises(ConfigError, match="objective.cl_weight"):
        validate_objective("cl_mim", {"cl_weight": -0.1})


def test_the_driver_records_the_demo_hybrid() -> None:
    """The driver's params/tags step (which collects the objective's frozen teachers) accepts the hybrid."""
    from pathlib import Path

    from maskray.config import load_config
    from maskray.run_spec import build_run_spec

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo" / "cl_mim_hybrid.yaml")
    params = build_run_spec(config, check_data_too=False).params
    assert params["objective.name"] == "cl_mim" and "objective.cl_weight" in params
