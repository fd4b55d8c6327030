"""The frozen-teacher registry (:mod:`maskray.teacher_sources`): each source resolves to a frozen teacher that
computes what its weights compute, in its own normalisation; a maskray run's teacher comes from the run's kept
artifact; errors are one line naming ``objective.teacher.<key>``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from maskray.config import Config
from maskray.errors import ConfigError
from maskray.export import export_encoder
from maskray.models import build_encoder
from maskray.models.pretrained import file_sha256
from maskray.teacher_sources import RANDOM_TAG, TeacherSpec, build_teacher, renormalize, teacher_run_record
from maskray.tracking import RunLogger, find_or_create_run
from maskray.weights import RUN_ARTIFACT

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "vit_tiny_patch16_224"
KEY = "objective.teacher"
SMALL = {"patch_size": 4, "depth": 2}


def _images(size: int = 16, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _error(call, key: str) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and f"'{KEY}.{key}'" in message, message
    return message


def _assert_frozen(teacher) -> None:
    assert not teacher.module.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher(_images(teacher.module.grid_size[0] * 4)).requires_grad


def test_renormalize_maps_one_normalisation_into_another() -> None:
    pixels = torch.rand(2, 3, 4, 4)
    mean, std, to_mean, to_std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    column = lambda values: torch.tensor(values).view(1, 3, 1, 1)  # noqa: E731
    student = (pixels - column(mean)) / column(std)
    expected = (pixels - column(to_mean)) / column(to_std)
    torch.testing.assert_close(renormalize(student, mean, std, to_mean, to_std), expected)
    torch.testing.assert_close(renormalize(student, mean, std, mean, std), student)
    with pytest.raises(ValueError, match="3 channels"):
        renormalize(student, (0.5,), (0.5,), to_mean, to_std)


def test_random_teacher_is_frozen_seeded_and_tagged_test_only() -> None:
    spec = TeacherSpec(source="random", arch=ARCH, model_kwargs=SMALL)
    teacher = build_teacher(spec, img_size=16)
    assert teacher(_images()).shape == (2, 16, 192) and teacher.module.grid_size == (4, 4)
    _assert_frozen(teacher)
    assert build_teacher(spec, img_size=16).sha256 == teacher.sha256
    assert build_teacher(spec.model_copy(update={"seed": 1}), img_size=16).sha256 != teacher.sha256
    assert (teacher.mean, teacher.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    params, tags = teacher_run_record(teacher, KEY)
    assert params == {f"{KEY}.sha256": teacher.sha256, f"{KEY}.resolved": f"random {ARCH} seed 0"}
    assert tags == {"teacher": RANDOM_TAG} and RANDOM_TAG == "random-init (test only)"


def test_timm_teacher_computes_its_weights_features(tmp_path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0, img_size=16, **SMALL).eval()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    teacher = build_teacher(TeacherSpec(source="timm", arch=ARCH, path=str(path), model_kwargs=SMALL), img_size=16)
    with torch.no_grad():
        expected = model.forward_features(_images())[:, 1:]
    torch.testing.assert_close(teacher(_images()), expected)
    _assert_frozen(teacher)
    assert teacher.sha256 == file_sha256(path)
    assert (teacher.mean, teacher.std) == (model.pretrained_cfg["mean"], model.pretrained_cfg["std"])  # the arch's
    # another input size: the position table is resampled, the grid follows
    larger = build_teacher(TeacherSpec(source="timm", arch=ARCH, path=str(path), model_kwargs=SMALL), img_size=32)
    assert larger(_images(32)).shape == (2, 64, 192)
    wrong = TeacherSpec(source="timm", arch=ARCH, path=str(path), model_kwargs={"patch_size": 4, "depth": 3})
    _error(lambda: build_teacher(wrong, img_size=16), "path")


def _maskray_checkpoint(directory: Path, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)) -> tuple[Config, Path]:
    config = Config.model_validate({"model": {"img_size": 16, "patch_size": 4, "depth": 2},
                                    "data": {"mean": mean, "std": std},
                                    "tracking": {"uri": f"sqlite:///{directory / 'none.db'}"}})
    torch.manual_seed(3)
    encoder = build_encoder(config.model)
    checkpoint = directory / "runs" / "teacher-run" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    save_file(encoder.timm_state_dict(), str(checkpoint / "encoder.safetensors"))
    (checkpoint / "model.json").write_text(json.dumps(config.model_dump(mode="json")))
    return config, checkpoint


def _encoder_patches(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    from maskray.checkpoint import load_encoder

    encoder, _ = load_encoder(checkpoint)
    with torch.no_grad():
        return encoder.eval()(images).patches


def test_maskray_teacher_from_a_checkpoint_and_from_its_export(tmp_path) -> None:
    _, checkpoint = _maskray_checkpoint(tmp_path)
    expected = _encoder_patches(checkpoint, _images())
    from_dir = build_teacher(TeacherSpec(source="maskray", path=str(checkpoint)), img_size=16)
    torch.testing.assert_close(from_dir(_images()), expected)
    _assert_frozen(from_dir)
    assert (from_dir.mean, from_dir.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))  # that run's data.mean / std
    export = export_encoder(tmp_path / "teacher.safetensors", checkpoint=checkpoint).path
    from_file = build_teacher(TeacherSpec(source="maskray", path=str(export)), img_size=16)
    torch.testing.assert_close(from_file(_images()), expected)
    assert (from_file.mean, from_file.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert from_file.sha256 == file_sha256(export)
    # a student at another image size: the teacher's table is resampled to the student's grid
    assert build_teacher(TeacherSpec(source="maskray", path=str(export)), img_size=32)(_images(32)).shape == (
        2, 64, 192)
    overridden = build_teacher(TeacherSpec(source="maskray", path=str(export), mean=(0.5,) * 3, std=(0.5,) * 3))
    assert overridden.mean == (0.5, 0.5, 0.5)


def test_maskray_teacher_from_a_run_id_survives_checkpoint_rotation(tmp_path) -> None:
    config, checkpoint = _maskray_checkpoint(tmp_path)
    expected = _encoder_patches(checkpoint, _images())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = find_or_create_run(uri, "teachers", "teacher-run", {}, {})
    spec = TeacherSpec(source="maskray", run_id=run_id, tracking_uri=uri)
    _error(lambda: build_teacher(spec), "run_id")  # no artifact yet: a run logs it when it finishes
    from maskray.checkpoint import load_encoder
    from maskray.engine.worker import log_final_encoder

    encoder, _ = load_encoder(checkpoint)
    log_final_encoder(RunLogger(uri, run_id), encoder, encoder.timm_state_dict(), config, step=1)
    shutil.rmtree(checkpoint.parent)  # Ray rotated the run's checkpoints away
    teacher = build_teacher(spec, img_size=16)
    torch.testing.assert_close(teacher(_images()), expected)
    assert (teacher.mean, teacher.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    params, tags = teacher_run_record(teacher, KEY)
    assert params[f"{KEY}.sha256"] == teacher.sha256 and run_id in params[f"{KEY}.resolved"]
    assert RUN_ARTIFACT in tags["teacher"]
    message = _error(lambda: build_teacher(spec.model_copy(update={"run_id": "0" * 32})), "run_id")
    assert "no run" in message


def test_open_clip_teacher_projects_its_patch_tokens(tmp_path) -> None:
    open_clip = pytest.importorskip("open_clip")
    model_config = {"embed_dim": 32, "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2,
                                                  "layers": 1},
                    "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "patch_size": 4, "head_width": 32}}
    config_file = tmp_path / "tiny-clip-test.json"
    config_file.write_text(json.dumps(model_config))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test").eval()
    weights = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    teacher = build_teacher(TeacherSpec(source="open_clip", arch=str(config_file), path=str(weights)), img_size=16)
    visual = model.visual
    with torch.no_grad():  # CLIP's patch target: ln_post(patch tokens) @ proj (CLS dropped)
        expected = visual.ln_post(visual.transformer(visual._embeds(_images())))[:, 1:] @ visual.proj
    torch.testing.assert_close(teacher(_images()), expected)
    _assert_frozen(teacher)
    assert teacher.module.embed_dim == 32 and teacher.sha256 == file_sha256(weights)
    assert teacher.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert teacher.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    _error(lambda: build_teacher(TeacherSpec(source="open_clip", arch="no-such-clip", path=str(weights))), "arch")


def test_open_clip_without_the_extra_says_how_to_install_it(tmp_path, monkeypatch) -> None:
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip raises ImportError
    message = _error(lambda: build_teacher(TeacherSpec(source="open_clip", arch="ViT-B-16", path=str(weights))),
                     "source")
    assert ".[clip]" in message


def test_spec_errors_name_the_key(tmp_path) -> None:
    missing = str(tmp_path / "missing.safetensors")
    TeacherSpec(source="timm", arch=ARCH, path=missing).check(KEY)  # files: when the teacher is built
    assert "no such file" in _error(lambda: build_teacher(TeacherSpec(source="timm", arch=ARCH, path=missing)), "path")
    _error(lambda: TeacherSpec(source="timm", path=missing).check(KEY), "arch")
    _error(lambda: TeacherSpec(source="maskray").check(KEY), "path")
    _error(lambda: TeacherSpec(source="maskray", path=missing, run_id="abc").check(KEY), "path")
    _error(lambda: build_teacher(TeacherSpec(source="maskray", path=missing)), "path")
    _error(lambda: TeacherSpec(source="maskray", run_id="abc", arch=ARCH).check(KEY), "arch")
    _error(lambda: TeacherSpec(source="random", arch=ARCH, path=missing).check(KEY), "path")
    _error(lambda: TeacherSpec(source="random", arch=ARCH, mean=(0.5, 0.5, 0.5)).check(KEY), "std")
    _error(lambda: build_teacher(TeacherSpec(source="random", arch="no_such_arch")), "arch")
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    _error(lambda: build_teacher(TeacherSpec(source="maskray", path=str(not_a_checkpoint))), "path")


def test_resolved_makes_paths_absolute_and_fixes_the_store(tmp_path) -> None:
    spec = TeacherSpec(source="maskray", path="exports/teacher.safetensors")
    assert spec.resolved(tmp_path, "sqlite:///x.db").path == str(tmp_path / "exports" / "teacher.safetensors")
    run = TeacherSpec(source="maskray", run_id="abc").resolved(tmp_path, "sqlite:///x.db")
    assert run.tracking_uri == "sqlite:///x.db" and run.model_dump(exclude_unset=True)["tracking_uri"]
    own = TeacherSpec(source="maskray", run_id="abc", tracking_uri="sqlite:///y.db").resolved(tmp_path, "z")
    assert own.tracking_uri == "sqlite:///y.db"
