"""Typed config: overrides, one-line errors, and launcher exit code 2 before any worker starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import launch, own_lines

from maskray.config import load_config
from maskray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  depth: 2\nobjective:\n  name: mae\n  mask_ratio: 0.6\n")
    config = load_config(path, ["optim.blr=0.01", "data.batch_size=8", "scaling.workers=3"])
    assert config.model.depth == 2 and config.objective.params == {"mask_ratio": 0.6}
    assert config.optim.blr == 0.01 and config.global_batch() == 24
    assert config.learning_rate() == pytest.approx(0.01 * 24 / 256)
    assert config.flat()["model.arch"] == "vit_tiny_patch16_224"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.nope=1"], "unknown key 'model.nope'"),
        (["data.batch_size=abc"], "key 'data.batch_size'"),
        (["objective.mask_ratio=2"], "key 'objective.mask_ratio'"),
        (["objective.bogus=1"], "unknown key 'objective.bogus'"),
        (["objective.name=nonexistent"], "unknown objective 'nonexistent'"),
        (["model.img_size=18"], "not divisible"),
        (["train.zero_stage=5"], "key 'train.zero_stage'"),
        (["data.std=[0.5, 0.0, 0.5]"], "key 'data.std'"),
    ],
)
def test_bad_values_name_the_key(overrides, fragment) -> None:
    """The core's keys by load_config, the objective's by its own Config (the run specification's first step)."""
    from maskray.objective import validate_objective

    with pytest.raises(ConfigError) as info:
        config = load_config(None, overrides)
        validate_objective(config.objective.name, config.objective.params)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_zero_stage_auto_is_0_for_one_worker_and_2_for_more() -> None:
    from maskray.config import zero_stage

    auto = load_config(None).train
    assert auto.zero_stage == "auto" and zero_stage(auto, 1) == 0 and zero_stage(auto, 2) == zero_stage(auto, 8) == 2
    assert zero_stage(load_config(None, ["train.zero_stage=3"]).train, 1) == 3  # an explicit stage is kept
    from maskray.run_spec import build_run_spec

    spec = build_run_spec(load_config(None, ["scaling.workers=1"]), check_data_too=False)
    assert spec.params["deepspeed.zero_stage"] == 0


def test_bad_yaml_names_the_file(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(path)


def _pretrain(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "pretrain.py"), *args],
        capture_output=True, text=True, cwd=cwd, timeout=120,
    )


def test_cli_config_error_exits_2_with_one_line(tmp_path) -> None:
    result = _pretrain("--config", str(REPO / "configs/demo/mae.yaml"), "--set", "model.colour=red", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown key 'model.colour'" in result.stderr


# the launcher in this process (the test above runs it as its own process)
def test_cli_missing_data_exits_2(tmp_path, capsys) -> None:
    assert launch("pretrain.py", "--set", f"data.shards={tmp_path / 'missing'}") == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "data.shards" in err[0] and "missing" in err[0], err


def test_cli_empty_dataset_exits_2(tmp_path, capsys) -> None:
    from maskray.data.manifest import write_manifest

    (tmp_path / "empty").mkdir()
    columns = {"shard": [], "key": [], "label": [], "nbytes": [], "sha256": [], "frames": []}
    write_manifest(tmp_path / "empty", columns, num_classes=0, class_names=(), source="test")
    assert launch("pretrain.py", "--set", f"data.shards={tmp_path / 'empty'}") == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "empty" in err[0], err
