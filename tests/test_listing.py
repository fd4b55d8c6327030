"""``launch/pretrain.py --list-objectives`` / ``--list-backbones``: every registered objective with its keys, the timm
archs MaskedViT wraps; neither imports Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from maskray.catalog import FieldRow, config_rows
from maskray.models import MaskedViT, MaskedViTCfg
from maskray.models.vit import _ARCH_MODULES, accepted_archs

REPO = Path(__file__).resolve().parents[1]
PLUGIN = '''
from pydantic import Field

from maskray.objective import Objective, ObjectiveParams, register_objective


class ListedParams(ObjectiveParams):
    views: int = Field(3, ge=1, le=9, description="how many views")


@register_objective("listed_only")
class Listed(Objective):
    """Found only by listing every module of the plugin package."""

    Config = ListedParams

    def loss(self, batch, outputs, ctx):
        raise NotImplementedError
'''


def _list(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the launcher under a wrapper that reports whether Ray was imported."""
    code = ("import runpy, sys\nsys.argv = ['pretrain.py', *sys.argv[1:]]\n"
            f"try:\n    runpy.run_path({str(REPO / 'launch' / 'pretrain.py')!r}, run_name='__main__')\n"
            "except SystemExit as done:\n    print('ray imported:', 'ray' in sys.modules, file=sys.stderr)\n"
            "    raise\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_list_objectives_shows_core_plugins_and_plugin_packages(tmp_path) -> None:
    package = tmp_path / "more_objectives"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "extra.py").write_text(PLUGIN)  # module name != objective name: get_objective would not find it
    result = _list("--list-objectives", env={
        "MASKRAY_PLUGINS": "objectives,maskray_testing,more_objectives,not_installed",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]]),
    })
    assert result.returncode == 0, result.stderr
    assert "ray imported: False" in result.stderr
    out = result.stdout
    for name in ("composite  (maskray.composite)", "mae  (objectives.mae)",
                 "twoview_ema  (maskray_testing.twoview_ema)", "listed_only  (more_objectives.extra)  Found only by"):
        assert name in out
    rows = [line.split() for line in out.splitlines()]
    assert ["objective.views", "int", "3", ">=", "1,", "<=", "9", "how", "many", "views"] in rows
    assert ["objective.momentum", "float", "0.9", ">=", "0.0,", "<=", "1.0"] in rows
    assert ["objective.parts", "list[PartConfig]", '[{"name":', '"mae",', '"weight":', "1.0}]", "len", ">=", "1",
            "each", "{name:", "<objective>,", "weight:", ">=", "0,", "<that", "objective's", "keys>}"] in rows


def test_config_rows_read_type_default_bounds_and_description() -> None:
    from objectives.mae import MAEParams

    rows = {row.key: row for row in config_rows(MAEParams, "objective")}
    assert rows["objective.mask_ratio"] == FieldRow("objective.mask_ratio", "float", "0.75", ">= 0.0, < 1.0",
                                                    "share of patches removed from the encoder's input")
    assert rows["objective.norm_pix"].default == "true" and rows["objective.norm_pix"].bounds == ""
    assert rows["objective.decoder_dim"].bounds == "> 0"


def test_list_backbones_without_ray() -> None:
    result = _list("--list-backbones")
    assert result.returncode == 0, result.stderr
    assert "ray imported: False" in result.stderr
    listed = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
    assert list(listed) == accepted_archs()
    assert listed["vit_tiny_patch16_224"] == "VisionTransformer" and listed["beitv2_base_patch16_224"] == "Beit"
    for rejected in ("vit_base_patch14_reg4_dinov2", "vit_base_patch16_siglip_224", "deit_tiny_distilled_patch16_224",
                     "vit_medium_patch16_gap_256", "deit3_small_patch16_224", "vit_small_patch16_18x2_224"):
        assert timm.is_model(rejected) and rejected not in listed


@pytest.mark.parametrize("arch", ["vit_small_patch16_224", "vit_base_patch16_clip_224", "vit_small_patch14_dinov2",
                                  "deit_tiny_patch16_224", "vit_small_patch16_36x1_224", "beit_base_patch16_224",
                                  "beit3_base_patch16_224", "eva_large_patch14_196", "vit_intern300m_patch14_448"])
def test_listed_archs_build_and_run(arch) -> None:
    assert arch in accepted_archs()
    encoder = MaskedViT(MaskedViTCfg(arch=arch, img_size=16, patch_size=4, depth=1))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = encoder(images, ids_keep=torch.tensor([[0, 5], [3, 9]]), return_attn=True)
    assert out.tokens.shape == (2, 3, encoder.embed_dim) and out.attn[0].shape[-1] == 3


@pytest.mark.parametrize("arch", ["vit_base_patch14_reg4_dinov2", "vit_base_patch16_siglip_224",
                                  "deit_tiny_distilled_patch16_224", "vit_small_patch16_18x2_224", "flexivit_small"])
def test_rejected_archs_do_not_build(arch) -> None:
    assert arch not in accepted_archs()
    with torch.device("meta"), pytest.raises(ValueError, match=arch):
        MaskedViT(MaskedViTCfg(arch=arch, img_size=16, patch_size=4, depth=1, pos_embed="learned"))


@pytest.mark.slow
def test_listing_is_exactly_what_maskedvit_builds() -> None:
    """Every arch of the ViT / DeiT / Beit modules (built on the meta device): listed iff MaskedViT accepts it (timm's
    test models aside)."""
    built = set()
    for name in timm.list_models():
        if timm.models.model_entrypoint(name).__module__ not in _ARCH_MODULES or name.startswith("test_"):
            continue
        try:
            with torch.device("meta"):
                MaskedViT(MaskedViTCfg(arch=name, img_size=16, patch_size=4, depth=1, pos_embed="learned"))
        except ValueError:
            continue
        built.add(name)
    assert set(accepted_archs()) == built
