"""The frozen-teacher registry: a typed ``teacher`` sub-config of an objective, resolved to a FrozenTeacher.

    objective:
      name: dtm
      teacher: {source: maskray, run_id: 3f2a...}                # an earlier maskray run's final encoder
      teacher: {source: maskray, path: exports/mae.safetensors}  # ... its export, or a checkpoint directory
      teacher: {source: timm, arch: vit_small_patch16_224, path: weights/vit_s16.safetensors}
      teacher: {source: open_clip, arch: ViT-B-16, path: weights/clip_vit_b16.bin}  # pip install -e '.[clip]'
      teacher: {source: random, arch: vit_tiny_patch16_224}      # tests and plumbing only (tagged so)

:func:`build_teacher` turns a :class:`TeacherSpec` into a :class:`~maskray.teachers.FrozenTeacher` (eval mode,
no_grad, its dtype, ``source``, weights' ``sha256``, input ``mean`` / ``std``) whose module maps images
(B, C, H, W), normalised with the teacher's ``mean`` / ``std``, to patch features (B, N, D): the final-norm patch
tokens, CLS and other prefix tokens dropped (a CNN's feature map flattened row-major); for OpenCLIP ``ln_post`` of
the patch tokens projected by ``visual.proj`` (DTM's CLIP target). A student batch is in the run's ``data.mean`` /
``data.std``; :func:`renormalize` maps it into the teacher's.

Sources (``weights`` below: a local file; nothing is downloaded):

- ``maskray``: ``run_id`` (in ``tracking_uri``, default the training run's own store): the artifact
  ``encoder/encoder.safetensors`` that every run logs when it finishes (:mod:`maskray.engine.worker`; an export
  with ``launch/export.py --run-id`` rewrites it). MLflow keeps it, so it resolves after the run's checkpoints
  have rotated away. Or ``path``: such an export file, or a checkpoint directory. Normalisation: that run's
  ``data.mean`` / ``data.std`` (the export's metadata, the checkpoint's ``model.json``).
- ``timm``: ``arch`` + weights ``path`` (a timm state dict, ``.safetensors`` or a weights-only pickle), loaded by
  ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=0,
  **model_kwargs)``. Normalisation: the arch's pretrained cfg (ImageNet's for timm's ViTs).
- ``open_clip``: ``arch`` (an OpenCLIP model name, or a model-config ``.json`` file) + weights ``path`` (a full
  CLIP checkpoint); the image tower is kept. Optional extra ``clip``. Normalisation: the model's preprocess cfg
  (OpenAI CLIP's mean / std for OpenAI weights).
- ``random``: ``arch`` (timm) initialised from ``seed``, frozen: a weak signal for tests and plumbing only; the
  run's tag ``teacher`` says ``random-init (test only)``. Normalisation: ImageNet's.

``mean`` / ``std`` override the source's normalisation. ``img_size``: the input size the teacher runs at; null:
the size :func:`build_teacher` is given (the student's: both see the same batch). A teacher trained at another
size has its absolute position table resampled (bicubic) to the new grid.

Checks (:meth:`TeacherSpec.check`, from the objective's ``check_config``: keys that do not fit the source) and
resolution errors (:func:`build_teacher`: a missing file, an unknown run id, a run without the artifact, weights
that do not fit) are one line naming ``<where>.<key>``; the driver resolves every teacher before any worker starts
(:func:`teacher_run_record`) and records ``<where>.sha256`` / ``<where>.resolved`` as params. Relative paths are
relative to the project root (:func:`maskray.config.project_root`) and made absolute by :meth:`TeacherSpec.resolved`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from maskray.checkpoint import CONFIG_FILE, ENCODER_FILE, read_checkpoint_config
from maskray.config import TrackingConfig, project_root
from maskray.data.transforms import IMAGENET_MEAN, IMAGENET_STD, channel_stats
from maskray.errors import ConfigError
from maskray.models import MaskedViT, MaskedViTCfg
from maskray.models.pretrained import (
    file_sha256,
    first_mismatch,
    load_pretrained,
    read_state_dict,
    timm_checkpoint_filter_fn,
)
from maskray.teachers import FrozenTeacher
from maskray.weights import RUN_ARTIFACT, read_weights_metadata, weights_init_kwargs

RANDOM_TAG = "random-init (test only)"
Source = Literal["maskray", "timm", "open_clip", "random"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LocatedSource(BaseModel):
    """A file or MLflow run an objective loads (a frozen teacher, a tokenizer): ``path``, ``run_id`` and its
    ``tracking_uri``. The objective's params find these wherever they sit
    (:meth:`maskray.objective.ObjectiveParams.map_sources`)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="a local file or directory")
    run_id: str | None = Field(None, description="an MLflow run")
    tracking_uri: str | None = Field(None, description="run_id: its MLflow store; null: the training run's")
    _key: str | None = PrivateAttr(None)  # its config key, for errors raised where it is loaded

    @property
    def key(self) -> str | None:
        """The config key this source was validated under (``objective.parts[1].teacher``), if known."""
        return self._key

    def keyed(self, key: str) -> LocatedSource:
        """A copy that knows its config key (:attr:`key`)."""
        copy = self.model_copy()
        copy._key = key
        return copy

    def check(self, where: str) -> None:
        """ConfigError naming ``<where>.<key>`` for keys that do not fit together (files are checked when the
        source is loaded: a config may name files that only the training machines hold)."""

    def resolved(self, base: Path, tracking_uri: str) -> LocatedSource:
        """A copy with ``path`` absolute (relative to ``base``) and a run id's ``tracking_uri`` fixed (default
        ``tracking_uri``, the training run's store), for workers that run elsewhere."""
        update: dict[str, Any] = {}
        if self.path is not None:
            update["path"] = str((base / Path(self.path).expanduser()).resolve())
        if self.run_id is not None and self.tracking_uri is None:
            update["tracking_uri"] = tracking_uri
        return self.model_copy(update=update)


class TeacherSpec(LocatedSource):
    """Where a frozen teacher comes from (see the module docstring for each ``source``'s keys)."""

    source: Source = Field(description="maskray | timm | open_clip | random")
    path: str | None = Field(None, description="weights file (timm, open_clip); export or checkpoint dir (maskray)")
    run_id: str | None = Field(None, description="maskray: the MLflow run whose final encoder is the teacher")
    arch: str | None = Field(None, description="timm arch (timm, random) or OpenCLIP model name / config .json")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="create_model overrides (timm, open_clip)")
    seed: int = Field(0, description="random: the initialisation seed")
    img_size: int | None = Field(None, gt=0, description="input size the teacher runs at; null: the student's")
    mean: tuple[float, ...] | None = Field(None, description="input normalisation; null: the source's own")
    std: tuple[float, ...] | None = Field(None, description="input normalisation; null: the source's own")
    dtype: Literal["fp32", "bf16"] = "fp32"
    sha256: str | None = Field(None, description="the weights' sha256: set by the driver when it resolves the "
                               "teacher, checked by every worker that builds it; null: not checked")

    def check(self, where: str) -> None:
        needs = {"maskray": (), "timm": ("arch", "path"), "open_clip": ("arch", "path"), "random": ("arch",)}
        unused = {"maskray": ("arch", "model_kwargs"), "timm": ("run_id",), "open_clip": ("run_id",),
                  "random": ("path", "run_id")}
        for key in needs[self.source]:
            if not getattr(self, key):
                raise ConfigError(f"key '{where}.{key}': source {self.source} needs {key}")
        for key in unused[self.source]:
            if getattr(self, key):
                raise ConfigError(f"key '{where}.{key}': not used by source {self.source}")
        if self.source == "maskray" and (self.path is None) == (self.run_id is None):
            raise ConfigError(f"key '{where}.path': source maskray needs one of path (an export or a checkpoint "
                              f"directory) and run_id (an MLflow run)")
        if (self.mean is None) != (self.std is None) or (self.mean and len(self.mean) != len(self.std or ())):
            raise ConfigError(f"key '{where}.std': give mean and std together, one value per channel")

    def local_path(self) -> Path:
        """``path``, relative ones under the project root."""
        if self.path is None:
            raise ValueError("this teacher has no path")
        return project_root() / Path(self.path).expanduser()


def renormalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], to_mean: Sequence[float],
    to_std: Sequence[float],
) -> torch.Tensor:
    """images (B, C, H, W) normalised with ``mean`` / ``std`` -> the same pixels normalised with ``to_mean`` /
    ``to_std``: ``(x * std + mean - to_mean) / to_std`` per channel (one value per channel each)."""
    channels = images.shape[1]
    if not all(len(values) == channels for values in (mean, std, to_mean, to_std)):
        raise ValueError(f"renormalize: {channels} channels, statistics of lengths "
                         f"{[len(v) for v in (mean, std, to_mean, to_std)]}")
    def column(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)

    scale = column(std) / column(to_std)
    shift = (column(mean) - column(to_mean)) / column(to_std)
    return (images.float() * scale + shift).to(images.dtype)


class ViTPatchFeatures(nn.Module):
    """A maskray encoder's final-norm patch tokens: images (B, C, H, W) -> (B, N, D)."""

    def __init__(self, encoder: MaskedViT) -> None:
        super().__init__()
        self.encoder = encoder
        self.embed_dim, self.grid_size = encoder.embed_dim, encoder.grid_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).patches


class TimmPatchFeatures(nn.Module):
    """A timm model's ``forward_features`` without its prefix tokens (a (B, D, h, w) map flattened row-major)."""

    def __init__(self, model: nn.Module, grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.embed_dim, self.grid_size = model.num_features, tuple(grid_size)

    @classmethod
    def probed(cls, model: nn.Module, in_chans: int, img_size: int) -> TimmPatchFeatures:
        """Its token grid: a ViT's patch grid, else the feature map of a zero image of ``img_size``."""
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is None:
            with torch.no_grad():
                features = model.eval().forward_features(torch.zeros(1, in_chans, img_size, img_size))
            grid = features.shape[-2:] if features.ndim == 4 else (features.shape[1], 1)
        return cls(model, grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(images)
        if features.ndim == 4:
            return features.flatten(2).transpose(1, 2)
        return features[:, getattr(self.model, "num_prefix_tokens", 0):]


class OpenClipPatchFeatures(nn.Module):
    """An OpenCLIP image tower's patch tokens after ``ln_post``, projected by ``proj``: (B, C, H, W) -> (B, N, E)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        visual.output_tokens = True
        self.embed_dim = visual.proj.shape[1] if visual.proj is not None else visual.ln_post.normalized_shape[0]
        self.grid_size = tuple(visual.grid_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(images)
        return tokens @ self.visual.proj if self.visual.proj is not None else tokens


def state_sha256(module: nn.Module) -> str:
    """Hex sha256 of a module's state dict (names and fp32 bytes, in order): a generated network's fingerprint."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_teacher(spec: TeacherSpec, img_size: int | None = None, where: str | None = None) -> FrozenTeacher:
    """The frozen teacher of ``spec`` running at ``spec.img_size`` (else ``img_size``, else its own size);
    ConfigError naming ``<where>.<key>`` when it cannot be resolved (``where`` default: the spec's config key,
    else ``objective.teacher``)."""
    where = where or spec.key or "objective.teacher"
    spec.check(where)
    if spec.path is not None:
        path = spec.local_path()
        if not path.exists() or (spec.source != "maskray" and not path.is_file()):
            raise ConfigError(f"key '{where}.path': no such file '{path}'")
    size = spec.img_size or img_size
    if spec.source == "maskray":
        if spec.run_id is not None:
            module, source, sha256, stats = _maskray_run(spec, size, where)
        else:
            module, sha256, stats = _maskray_path(spec.local_path(), size, f"{where}.path")
            source = f"maskray {spec.local_path()}"
    elif spec.source == "timm":
        module, stats = _timm(spec, size, where)
        source, sha256 = f"timm {spec.arch} {spec.local_path()}", file_sha256(spec.local_path())
    elif spec.source == "open_clip":
        module, stats = _open_clip(spec, size, where)
        source, sha256 = f"open_clip {spec.arch} {spec.local_path()}", file_sha256(spec.local_path())
    else:
        module, stats = _random(spec, size, where)
        source, sha256 = f"random {spec.arch} seed {spec.seed}", state_sha256(module)
    if spec.sha256 is not None and sha256 != spec.sha256:
        raise ConfigError(f"key '{where}.sha256': the teacher's weights ({source}) hash to {sha256[:12]}..., not "
                          f"the {spec.sha256[:12]}... the driver resolved: they changed since the run started, or "
                          f"this machine holds other ones")
    mean, std = (spec.mean, spec.std) if spec.mean is not None else stats
    return FrozenTeacher(module, DTYPES[spec.dtype], source=source, sha256=sha256, mean=tuple(mean),
                         std=tuple(std), spec=spec)


def teacher_run_record(teacher: FrozenTeacher, where: str) -> tuple[dict[str, str], dict[str, str]]:
    """The training run's ``(params, tags)`` for a teacher built from config key ``where``: ``<where>.sha256`` and
    ``<where>.resolved`` (the teacher's ``source``), and the tag ``teacher`` (for ``objective.teacher``;
    ``parts[0].teacher`` inside a composite): the source, or ``random-init (test only)``."""
    spec = teacher.spec
    tag = where.removeprefix("objective.")
    return ({f"{where}.sha256": teacher.sha256, f"{where}.resolved": teacher.source},
            {tag: RANDOM_TAG if spec.source == "random" else teacher.source})


def _maskray_path(path: Path, size: int | None, key: str) -> tuple[nn.Module, str, tuple]:
    """A maskray export file or checkpoint directory -> (patch features, weights' sha256, (mean, std))."""
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file() or not (path / ENCODER_FILE).is_file():
            raise ConfigError(f"key '{key}': '{path}' has no {CONFIG_FILE} and {ENCODER_FILE} (not a maskray "
                              f"checkpoint)")
        config = read_checkpoint_config(path)
        options = MaskedViTCfg.of(config.model)
        stats = channel_stats(config.data.mean, config.data.std, config.model.in_chans)
        weights = path / ENCODER_FILE
    else:
        metadata = read_weights_metadata(path, key=f"key '{key}'")
        if "mean" not in metadata:
            raise ConfigError(f"key '{key}': '{path}' records no input normalisation (an export from before the "
                              f"teacher registry): give the teacher's mean and std")
        options = MaskedViTCfg(**weights_init_kwargs(metadata))
        stats = (tuple(json.loads(metadata["mean"])), tuple(json.loads(metadata["std"])))
        weights = path
    encoder = MaskedViT(options.model_copy(update={"drop_path_rate": 0.0, **({"img_size": size} if size else {})}))
    return ViTPatchFeatures(encoder), load_pretrained(encoder, weights, key).sha256, stats


def _maskray_run(spec: TeacherSpec, size: int | None, where: str) -> tuple[nn.Module, str, str, tuple]:
    """The final encoder logged by MLflow run ``spec.run_id`` (artifact ``encoder/encoder.safetensors``)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = spec.tracking_uri or TrackingConfig().resolved_uri()
    client = MlflowClient(uri)
    try:
        client.get_run(spec.run_id)
    except MlflowException:
        raise ConfigError(f"key '{where}.run_id': no run '{spec.run_id}' in the MLflow store {uri}") from None
    with tempfile.TemporaryDirectory() as directory:
        try:
            local = Path(client.download_artifacts(spec.run_id, RUN_ARTIFACT, directory))
        except (MlflowException, OSError):
            raise ConfigError(f"key '{where}.run_id': run '{spec.run_id}' has no artifact {RUN_ARTIFACT} (a run "
                              f"logs it when it finishes; or export one: launch/export.py --run-id "
                              f"{spec.run_id} --out FILE)") from None
        module, sha256, stats = _maskray_path(local, size, f"{where}.run_id")
    return module, f"maskray run {spec.run_id} ({uri}) {RUN_ARTIFACT}", sha256, stats


def _timm(spec: TeacherSpec, size: int | None, where: str) -> tuple[nn.Module, tuple]:
    """timm ``arch`` with the state dict of ``path``: the classifier dropped, the arch module's own
    ``checkpoint_filter_fn`` applied (a ViT's position table resampled to ``size``), then loaded strictly (timm's
    ``pretrained=True`` loads non-strictly once the classifier differs, which would hide missing blocks)."""
    model = _timm_model(spec, size, where)
    state = timm_checkpoint_filter_fn(read_state_dict(spec.local_path(), f"{where}.path"))
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    problem = first_mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"key '{where}.path': '{spec.local_path()}' does not fit timm {spec.arch}: {problem}")
    model.load_state_dict(state, strict=True)
    cfg = model.pretrained_cfg
    return _timm_features(model, spec, size), (tuple(cfg.get("mean", IMAGENET_MEAN)),
                                               tuple(cfg.get("std", IMAGENET_STD)))


def _timm_model(spec: TeacherSpec, size: int | None, where: str) -> nn.Module:
    import timm

    kwargs = {**({"img_size": size} if size else {}), **spec.model_kwargs}
    try:
        return timm.create_model(spec.arch, pretrained=False, num_classes=0, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"key '{where}.arch': timm cannot build {spec.arch} with {kwargs}: {err}") from None


def _timm_features(model: nn.Module, spec: TeacherSpec, size: int | None) -> TimmPatchFeatures:
    size = size or model.pretrained_cfg.get("input_size", (224,))[-1]
    return TimmPatchFeatures.probed(model, spec.model_kwargs.get("in_chans", 3), size)


def _open_clip(spec: TeacherSpec, size: int | None, where: str) -> tuple[nn.Module, tuple]:
    try:
        import open_clip
    except ImportError:
        raise ConfigError(f"key '{where}.source': open_clip needs the optional extra clip "
                          f"(pip install -e '.[clip]')") from None
    name = spec.arch or ""
    if name.endswith(".json"):  # a model config file: registered under its file name
        config_file = project_root() / Path(name).expanduser()
        if not config_file.is_file():
            raise ConfigError(f"key '{where}.arch': no such file '{config_file}'")
        open_clip.add_model_config(config_file)
        name = config_file.stem
    if name not in open_clip.list_models():
        raise ConfigError(f"key '{where}.arch': unknown OpenCLIP model {name!r}")
    path = spec.local_path()
    try:
        model = open_clip.create_model(name, pretrained=str(path), force_image_size=size, **spec.model_kwargs)
    except RuntimeError as err:
        raise ConfigError(f"key '{where}.path': '{path}' does not fit OpenCLIP {name}: "
                          f"{str(err).splitlines()[0]}") from None
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean, std = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return OpenClipPatchFeatures(model.visual), (tuple(mean), tuple(std))


def _random(spec: TeacherSpec, size: int | None, where: str) -> tuple[nn.Module, tuple]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = _timm_model(spec, size, where)
    return _timm_features(model, spec, size), (IMAGENET_MEAN, IMAGENET_STD)
