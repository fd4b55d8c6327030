"""Typed run configuration: YAML file + ``--set a.b=value`` overrides, validated before any worker starts.

Every knob has a default that runs the bundled demo (``configs/demo/mae.yaml`` only names the demo data).
Errors surface as :class:`~maskray.errors.ConfigError` with one line naming the file and the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from maskray.errors import ConfigError
from maskray.models.vit import MaskedViTCfg
from maskray.storage import is_uri, refuse_shell


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(MaskedViTCfg):
    """Backbone: every option of the encoder (:class:`~maskray.models.vit.MaskedViTCfg`, defined there once), plus
    the weights it starts from."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    init_from: str | None = Field(
        None, description="start the encoder from this local file: a timm state dict (.safetensors, or .pth loaded "
        "weights-only; maskray's export is one), an MAE-reference or a Hugging Face ViTMAE checkpoint; null: random"
    )


class DataConfig(Section):
    """Training data stream (WebDataset shards written by ``launch/make_shards.py``)."""

    shards: str = "data/demo/train"
    batch_size: int = Field(64, gt=0, description="micro-batch per worker")
    num_workers: int = Field(1, ge=0, description="loader processes per training worker")
    resampled: bool = True
    shuffle_buffer: int = Field(1000, ge=0)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = False
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="stop the run when more than this fraction of the samples read so far was "
        "lost (truncated or missing shards, undecodable samples, sha256 mismatches); 1 never stops"
    )
    verify_sha256: bool = Field(False, description="check each sample's bytes against the manifest's sha256 "
                                "while reading; a sample that differs is dropped and reported like a corrupt one")

    @field_validator("shards")
    @classmethod
    def _not_a_shell_command(cls, value: str) -> str:
        refuse_shell(value)
        return value

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not all(std > 0 for std in value):
            raise ValueError("every std must be > 0 (the inputs are divided by it)")
        return value

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] <= value[1] <= 1.0:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        return value


class ObjectiveConfig(BaseModel):
    """``name`` picks a registered objective; the other keys are kept as given here and validated into that
    objective's typed Config by the run specification (:func:`maskray.run_spec.build_run_spec`)."""

    model_config = ConfigDict(extra="allow")

    name: str = "mae"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(Section):
    """AdamW with linear warmup then half-cycle cosine; lr = blr * global_batch / 256 unless ``lr`` is set."""

    lr: float | None = Field(None, gt=0.0)
    blr: float = Field(1.5e-3, gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(100, ge=0)
    grad_accum: int = Field(1, ge=1)
    clip_grad: float = Field(0.0, ge=0.0, description="max grad norm; 0 disables clipping")


class TrainConfig(Section):
    """Loop length (optimizer steps), logging, checkpointing and DeepSpeed settings."""

    steps: int = Field(800, gt=0)
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(400, gt=0)
    seed: int = 0
    max_bad_batches: int = Field(
        20, gt=0, description="stop the run after this many consecutive batches whose loss is non-finite (NaN/inf) "
        "on any rank; each such batch is dropped (no backward) and counted in the metric bad_batches"
    )
    zero_stage: Literal["auto", 0, 1, 2, 3] = Field(
        "auto", description="DeepSpeed ZeRO stage; auto: 0 for a one-worker run (nothing to partition, and ZeRO-2's "
        "gradient bucket and fp32 gradient partition cost ~30 % of a CPU bf16 step there), 2 for more"
    )
    precision: Literal["auto", "fp32", "bf16"] = "auto"


def zero_stage(train: TrainConfig, world_size: int) -> int:
    """The ZeRO stage a run of ``world_size`` workers uses: ``train.zero_stage``, with ``auto`` resolved to 0 for
    one worker and 2 for more."""
    if train.zero_stage == "auto":
        return 0 if world_size == 1 else 2
    return train.zero_stage


class ScalingSection(Section):
    """How many Ray Train workers and what each one gets.

    ``max_failures`` (Ray Train's FailureConfig): how many times a run whose worker died or raised is restarted
    from its latest checkpoint, in the same MLflow run. The default 3 survives the occasional lost node or
    preempted worker of a run that lasts days, while a bug that fails every attempt stops after 3 restarts
    instead of looping forever (-1: unlimited, for preemptible fleets that are known to be healthy; 0: none).
    Ray counts node preemptions announced by a drain separately (unlimited).
    """

    workers: int = Field(2, ge=1)
    use_gpu: bool | None = Field(None, description="null: use GPUs when the cluster has them")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(3, ge=-1, description="restarts from the latest checkpoint after a worker failure "
                              "(-1: unlimited, 0: none)")
    checkpoints_to_keep: int = Field(2, ge=1)


class EvalConfig(Section):
    """k-NN evaluation on frozen features (DINO protocol: cosine, k=20, T=0.07)."""

    train_shards: str | None = "data/demo/train"
    test_shards: str | None = "data/demo/test"
    knn_k: int = Field(20, gt=0)
    knn_temperature: float = Field(0.07, gt=0.0)
    feature: Literal["cls", "mean"] = "mean"
    batch_size: int = Field(256, gt=0)
    random_init: bool = True
    every: int = Field(200, ge=0, description="k-NN every N optimizer steps during training (0: only at the end)")

    @field_validator("train_shards", "test_shards")
    @classmethod
    def _not_a_shell_command(cls, value: str | None) -> str | None:
        if value is not None:
            refuse_shell(value)
        return value

    @property
    def knn_enabled(self) -> bool:
        return bool(self.train_shards and self.test_shards)


def project_root() -> Path:
    """Where relative paths in a config point: ``$MASKRAY_ROOT`` if set, else the working directory.

    ``ray job submit --working-dir .`` runs the driver in a temporary copy of the repository; setting
    ``MASKRAY_ROOT`` to the submitting checkout (``make demo-job`` does) keeps data and tracking there.
    """
    return Path(os.environ.get("MASKRAY_ROOT") or Path.cwd())


class TrackingConfig(Section):
    """MLflow and Ray storage. ``uri`` null: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db``
    (root: :func:`project_root`)."""

    uri: str | None = None
    experiment: str = "maskray"
    storage_path: str = "runs"
    tags: dict[str, str] = Field(default_factory=dict)

    def resolved_uri(self) -> str:
        if self.uri:
            return self.uri
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


class Config(Section):
    """The whole run configuration."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def global_batch(self) -> int:
        """Images per optimizer step across all workers."""
        return self.data.batch_size * self.optim.grad_accum * self.scaling.workers

    def learning_rate(self) -> float:
        return self.optim.lr if self.optim.lr is not None else self.optim.blr * self.global_batch() / 256

    def resolved(self, base: Path | None = None) -> Config:
        """A copy in which the core's local paths are absolute (workers run in other directories) and the tracking
        URI is fixed, so every process of the run sees the same data, storage and MLflow store. The objective's own
        paths (teachers, tokenizers) are resolved with its typed params (:mod:`maskray.run_spec`)."""
        base = base or project_root()

        def absolute(path: str | None) -> str | None:
            if path is None or is_uri(path):
                return path
            return str((base / Path(path.removeprefix("file://")).expanduser()).resolve())

        update = self.model_copy(deep=True)
        update.model.init_from = absolute(self.model.init_from)
        update.data.shards = absolute(self.data.shards)
        update.eval.train_shards = absolute(self.eval.train_shards)
        update.eval.test_shards = absolute(self.eval.test_shards)
        update.tracking.storage_path = absolute(self.tracking.storage_path)
        update.tracking.uri = self.tracking.resolved_uri()
        return update

    def run_tags(self) -> dict[str, str]:
        """The MLflow tags of a run of this config (one definition for training and evaluation): objective,
        backbone, dataset (the shard directory's last two path parts, e.g. ``demo/train``), dataset_path, plus
        ``tracking.tags``."""
        parts = self.objective.params.get("parts") if self.objective.name == "composite" else None
        return {
            "objective": self.objective.name,
            **({"objective_parts": "+".join(str(part.get("name")) for part in parts)} if parts else {}),
            "backbone": self.model.arch,
            "dataset": "/".join(Path(self.data.shards).parts[-2:]),
            "dataset_path": self.data.shards,
            **self.tracking.tags,
        }

    def flat(self) -> dict[str, Any]:
        """Flattened ``{"a.b": value}`` view for MLflow params."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {dotted}: cannot parse value {raw!r}: {err.problem}") from None


def describe_validation_error(error: ValidationError, where: str = "") -> str:
    """One line naming the first bad key (under ``where``): ``key 'objective.mask_ratio': <message>``."""
    first = error.errors()[0]
    key = ".".join([*([where] if where else []), *(str(part) for part in first["loc"])]) or where
    if first["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    return f"key '{key}': {first['msg']}"


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (YAML, may be None for all defaults), apply overrides, validate the core's sections.

    The objective's own keys are checked against its registered Config class by
    :func:`maskray.run_spec.build_run_spec` (which knows the objective registry; this module does not).
    """
    source = str(path) if path else "<defaults>"
    tree: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config ({err.strerror})") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: invalid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        config = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe_validation_error(err)}") from None
    return config
