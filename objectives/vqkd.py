"""VQ-KD: the BEiT v2 visual tokenizer (Peng et al. 2022, "BEiT v2: Masked Image Modeling with Vector-Quantized
Visual Tokenizers"; spec ``objectives.md`` 5.1 and A.4; reference microsoft/unilm ``beit2/modeling_vqkd.py``,
``beit2/norm_ema_quantizer.py``).

The student backbone is the tokenizer's encoder (a ViT, evaluated by k-NN like any encoder). Per patch its tokens
go through the encode task layer (Linear -> Tanh -> Linear to ``code_dim``), are L2-normalised and replaced by the
nearest code of an L2-normalised codebook (highest cosine, :func:`nearest_codes`), with a straight-through gradient
and the commitment loss ``beta * mse(sg(z_q), z)``. A small decoder (ViT blocks over the code map, then the decode
task layer) reconstructs the frozen teacher's patch features; the loss is ``mean(1 - cos(rec, target)) +
commitment``. The codebook is not optimised: it follows the norm-EMA rule (:func:`ema_codebook`, decay 0.99) with
assignment counts and sums all-reduced over ranks, so it stays identical on every rank.

Decisions vs the reference:

- k-means initialisation (cosine, ``kmeans_iters`` iterations, on the first training batch, as the reference) runs
  on rank 0's batch and is broadcast: the reference runs it on every GPU's own batch, which leaves the ranks with
  different codebooks (its codebook is a non-trainable parameter that DDP never synchronises after construction).
- dead-code restarts (the reference has none; it relies on k-means init, normalisation and the small code dim):
  ``idle`` counts, per code, the training forwards in a row in which no rank assigned it; a code idle for
  ``restart_after`` forwards is replaced by a random L2-normalised encoder output of the current batch (rank 0's
  draw, broadcast) and its count restarts. ``restart_after: 0`` turns restarts off (the reference's behaviour).
- the codebook and its state are fp32 buffers (checkpointed and resumed with the module state, exactly) that stay
  fp32 when DeepSpeed casts the model to bf16 (:meth:`NormEMAQuantizer._apply`); the quantizer computes in fp32,
  as the reference runs its task layers in fp32.
- the decoder reads the code map with a fixed 2-D sin-cos position embedding and no CLS token (the reference builds
  a full ViT with patch size 1 and a CLS token it never reads).
- the teacher sees the same crop as the encoder, as [0, 1] pixels normalised with the teacher's own statistics
  (:class:`~maskray.data.views.SharedCrop`); when its patch grid differs from the encoder's, its feature map is
  resized bilinearly to the encoder's grid.

The run keeps the whole tokenizer (encoder, encode task layer, codebook, normalisation; :func:`save_tokenizer`) as
the MLflow artifact ``tokenizer`` at the end; :func:`load_tokenizer` reads it back (from a directory or the run id,
:class:`TokenizerSource`) as the :class:`VQKDTokenizer` that ``beitv2`` predicts.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block

from maskray.config import TrackingConfig, project_root
from maskray.context import StepContext
from maskray.data.transforms import channel_stats
from maskray.distributed import all_reduce_sum, broadcast
from maskray.errors import ConfigError
from maskray.models import MaskedViT, MaskedViTCfg, sincos_2d
from maskray.models.pretrained import file_sha256
from maskray.objective import Objective, ObjectiveOutput, ObjectiveParams, register_objective
from maskray.passes import EncoderPass, PassOutput
from maskray.teacher_sources import LocatedSource, TeacherSpec, build_teacher, renormalize
from maskray.teachers import FrozenTeacher

ARTIFACT = "tokenizer"
CONFIG_FILE = "tokenizer.json"
WEIGHTS_FILE = "tokenizer.safetensors"


# -- the quantizer's steps, each a pure function -----------------------------------------------------------------
def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows of x (..., d) scaled to unit L2 norm."""
    return F.normalize(x, p=2.0, dim=-1)


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """z: (N, d), codebook: (K, d), both unit rows -> (N,) index of the highest-cosine code (= the nearest one)."""
    return (z @ codebook.t()).argmax(dim=-1)


def code_statistics(z: torch.Tensor, codes: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z: (N, d), codes: (N,) -> (counts (K,), sums (K, d)): how many rows each code got and their sum."""
    counts = torch.bincount(codes, minlength=num_codes).to(z.dtype)
    sums = torch.zeros(num_codes, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, codes, z)
    return counts, sums


def ema_codebook(codebook: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, decay: float) -> torch.Tensor:
    """The norm-EMA update (spec A.4): used codes move to ``l2n(decay * code + (1 - decay) * l2n(mean))`` of
    the rows assigned to them, unused codes keep their value (``l2n(code)``). codebook: (K, d); counts: (K,);
    sums: (K, d)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    mean = l2_normalise(sums / counts.clamp_min(1.0).unsqueeze(1))
    mean = torch.where((counts == 0).unsqueeze(1), codebook, mean)
    return l2_normalise(decay * codebook + (1.0 - decay) * mean)


def cosine_kmeans(
    samples: torch.Tensor, num_codes: int, iters: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means on unit rows samples (N, d) -> (means (K, d) unit rows, counts (K,)). Starts from K
    distinct random samples (with repetition when N < K); a cluster that empties keeps its previous mean."""
    n = samples.shape[0]
    if n >= num_codes:
        start = torch.randperm(n, generator=generator, device=samples.device)[:num_codes]
    else:
        start = torch.randint(0, n, (num_codes,), generator=generator, device=samples.device)
    means = samples[start]
    counts = torch.zeros(num_codes, dtype=samples.dtype, device=samples.device)
    for _ in range(iters):
        counts, sums = code_statistics(samples, nearest_codes(samples, means), num_codes)
        means = torch.where((counts == 0).unsqueeze(1), means, l2_normalise(sums))
    return means, counts


def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code histogram counts (K,): K for uniform use, 1 when one code takes everything."""
    p = counts.float() / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum())


class Quantized(NamedTuple):
    """quantized: (N, d) the codes with a straight-through gradient to z; codes: (N,); commitment: scalar;
    counts: (K,) assignments of this forward summed over ranks (fp32)."""

    quantized: torch.Tensor
    codes: torch.Tensor
    commitment: torch.Tensor
    counts: torch.Tensor


class NormEMAQuantizer(nn.Module):
    """Cosine codebook lookup with a norm-EMA codebook (spec A.4), k-means initialisation and dead-code restarts.

    Buffers (fp32, persistent, identical on every rank): ``codebook`` (K, d) unit rows, ``initialised`` (k-means
    done), ``idle`` (K,) training forwards since each code was last assigned. In eval mode nothing changes.
    """

    def __init__(
        self, num_codes: int, dim: int, decay: float = 0.99, beta: float = 1.0, kmeans_iters: int = 10,
        restart_after: int = 100,
    ) -> None:
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.decay, self.beta, self.kmeans_iters, self.restart_after = decay, beta, kmeans_iters, restart_after
        self.register_buffer("codebook", torch.zeros(num_codes, dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("idle", torch.zeros(num_codes, dtype=torch.long))

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply; dtype casts (DeepSpeed's ``module.bfloat16()``) leave the codebook in fp32."""
        super()._apply(fn, recurse)
        self.codebook = self.codebook.float()
        return self

    @torch.no_grad()
    def initialise(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """k-means on z (N, d) unit rows; rank 0's result on every rank."""
        means, _ = cosine_kmeans(z, self.num_codes, self.kmeans_iters, generator)
        self.codebook.copy_(broadcast(means))
        self.initialised.fill_(True)
        self.idle.zero_()

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, counts: torch.Tensor, generator: torch.Generator | None = None
                           ) -> int:
        """Count idle forwards from ``counts`` (K,) (all ranks) and re-initialise codes idle for ``restart_after``
        forwards from random rows of z (N, d) (rank 0's draw). Returns how many codes were restarted."""
        self.idle.copy_(torch.where(counts > 0, torch.zeros_like(self.idle), self.idle + 1))
        if self.restart_after <= 0:
            return 0
        dead = torch.nonzero(self.idle >= self.restart_after).flatten()
        if dead.numel() == 0:
            return 0
        picks = torch.randint(0, z.shape[0], (dead.numel(),), generator=generator, device=z.device)
        self.codebook[dead] = broadcast(z[picks])
        self.idle[dead] = 0
        return int(dead.numel())

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> Quantized:
        """z: (N, d) encoder outputs (any dtype; computed in fp32) -> :class:`Quantized` (quantized in fp32)."""
        z = l2_normalise(z.float())
        if self.training and not bool(self.initialised):
            self.initialise(z.detach(), generator)
        codes = nearest_codes(z.detach(), self.codebook)
        z_q = self.codebook[codes]  # a copy: the update below does not change it
        counts, sums = code_statistics(z.detach(), codes, self.num_codes)
        counts = all_reduce_sum(counts)
        if self.training:
            with torch.no_grad():
                self.codebook.copy_(ema_codebook(self.codebook, counts, all_reduce_sum(sums), self.decay))
                self.restart_dead_codes(z.detach(), counts, generator)
        commitment = self.beta * F.mse_loss(z_q, z)
        return Quantized(z + (z_q - z).detach(), codes, commitment, counts)


def task_layer(in_dim: int, out_dim: int) -> nn.Sequential:
    """The reference's encode / decode task layer: Linear(in, in) -> Tanh -> Linear(in, out)."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.Tanh(), nn.Linear(in_dim, out_dim))


class CodeDecoder(nn.Module):
    """Quantized code map (B, L, d) -> reconstructed teacher features (B, L, out_dim): a linear embedding to
    ``dim``, fixed 2-D sin-cos positions of ``grid``, ``depth`` ViT blocks, LayerNorm, the decode task layer."""

    def __init__(self, code_dim: int, grid: tuple[int, int], out_dim: int, dim: int, depth: int, num_heads: int
                 ) -> None:
        super().__init__()
        self.embed = nn.Linear(code_dim, dim)
        self.register_buffer("pos_embed", sincos_2d(dim, grid, cls_slot=False), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, 4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = task_layer(dim, out_dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes) + self.pos_embed.to(codes.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# -- the tokenizer artifact ----------------------------------------------------------------------------------------
class VQKDTokenizer(nn.Module):
    """Images in [0, 1] (B, C, H, W) -> code indices (B, L): normalise with the tokenizer's own ``mean`` / ``std``,
    encoder patch tokens, encode task layer, nearest code. Use it in eval mode (a frozen teacher is)."""

    def __init__(self, encoder: MaskedViT, encode_task: nn.Module, quantizer: NormEMAQuantizer,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.encoder, self.encode_task, self.quantizer = encoder, encode_task, quantizer
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        z = self.encode_task(self.encoder((pixels - mean) / std).patches)  # (B, L, d)
        return nearest_codes(l2_normalise(z.flatten(0, 1).float()), self.quantizer.codebook).view(z.shape[:2])


def save_tokenizer(directory: str | Path, tokenizer: VQKDTokenizer) -> Path:
    """Write ``tokenizer.safetensors`` (encoder timm state under ``encoder.``, encode task layer, codebook) and
    ``tokenizer.json`` (encoder arguments, codebook size, normalisation) into ``directory``; returns it."""
    quantizer = tokenizer.quantizer
    if not bool(quantizer.initialised):
        raise ValueError("the tokenizer's codebook was never initialised (no training step ran)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {f"encoder.{key}": value for key, value in tokenizer.encoder.timm_state_dict().items()}
    weights |= {f"encode_task.{key}": value.detach().cpu() for key, value in tokenizer.encode_task.state_dict().items()}
    weights["codebook"] = quantizer.codebook.detach().cpu()
    save_file({key: value.float().contiguous() for key, value in weights.items()}, directory / WEIGHTS_FILE)
    config = {"encoder": tokenizer.encoder.init_kwargs, "num_codes": quantizer.num_codes, "code_dim": quantizer.dim,
              "mean": list(tokenizer.mean), "std": list(tokenizer.std)}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


class TokenizerSource(LocatedSource):
    """Where a saved tokenizer is: ``path`` (a directory written by :func:`save_tokenizer`; relative paths under
    the project root) or ``run_id`` (a ``vqkd`` run's artifact ``tokenizer`` in ``tracking_uri``, default: the
    training run's own store)."""

    path: str | None = Field(None, description="a tokenizer directory")
    run_id: str | None = Field(None, description="the MLflow run of a vqkd objective")

    def check(self, where: str) -> None:
        """ConfigError naming ``<where>.path`` unless exactly one of path and run_id is given."""
        if (self.path is None) == (self.run_id is None):
            raise ConfigError(f"key '{where}.run_id': give one of run_id (a vqkd run) and path (a tokenizer "
                              "directory)")

    def directory(self, download_to: str | Path) -> Path:
        """The local tokenizer directory (a run's artifact is downloaded under ``download_to``)."""
        if self.run_id is None:
            path = project_root() / Path(self.path or "").expanduser()
        else:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            uri = self.tracking_uri or TrackingConfig().resolved_uri()
            try:
                path = Path(MlflowClient(uri).download_artifacts(self.run_id, ARTIFACT, str(download_to)))
            except (MlflowException, OSError):
                raise ConfigError(f"run '{self.run_id}' in {uri} has no artifact '{ARTIFACT}' (a vqkd run logs "
                                  "it when it finishes)") from None
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"'{path}' is no tokenizer directory (no {CONFIG_FILE})")
        return path


def load_tokenizer(source: TokenizerSource) -> tuple[VQKDTokenizer, str, str]:
    """Read a tokenizer saved by :func:`save_tokenizer` -> (tokenizer in eval mode, where it came from, sha256 of
    its weights)."""
    with tempfile.TemporaryDirectory() as download:
        directory = source.directory(download)
        tokenizer, sha256 = _read_tokenizer(directory)
    origin = f"vqkd run {source.run_id} ({source.tracking_uri})" if source.run_id else str(directory.resolve())
    return tokenizer, origin, sha256


def _read_tokenizer(directory: Path) -> tuple[VQKDTokenizer, str]:
    config = json.loads((directory / CONFIG_FILE).read_text())
    weights = load_file(str(directory / WEIGHTS_FILE))
    encoder = MaskedViT(MaskedViTCfg(**config["encoder"]))
    encoder.vit.load_state_dict({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")})
    encode_task = task_layer(encoder.embed_dim, config["code_dim"])
    encode_task.load_state_dict({k[len("encode_task."):]: v for k, v in weights.items()
                                 if k.startswith("encode_task.")})
    quantizer = NormEMAQuantizer(config["num_codes"], config["code_dim"])
    quantizer.codebook.copy_(weights["codebook"])
    quantizer.initialised.fill_(True)
    tokenizer = VQKDTokenizer(encoder, encode_task, quantizer, config["mean"], config["std"]).eval()
    return tokenizer, file_sha256(directory / WEIGHTS_FILE)


# -- the teacher ---------------------------------------------------------------------------------------------------
def teacher_patches(teacher: FrozenTeacher, pixels: torch.Tensor, size: int, grid: tuple[int, int]) -> torch.Tensor:
    """The teacher's patch features (B, gh*gw, Dt) of pixels (B, C, H, W) in [0, 1]: resized to the teacher's
    input ``size`` (bicubic) if needed, normalised with the teacher's own ``mean`` / ``std``; its feature map resized
    (bilinear) to ``grid`` when the teacher's grid differs."""
    if pixels.shape[-1] != size or pixels.shape[-2] != size:
        pixels = F.interpolate(pixels.float(), size=(size, size), mode="bicubic", align_corners=False).to(pixels.dtype)
    channels = pixels.shape[1]
    patches = teacher(renormalize(pixels, (0.0,) * channels, (1.0,) * channels, teacher.mean, teacher.std))
    own = tuple(teacher.module.grid_size)
    if own == tuple(grid):
        return patches
    batch, _, dim = patches.shape
    feature_map = patches.transpose(1, 2).reshape(batch, dim, *own).float()
    resized = F.interpolate(feature_map, size=tuple(grid), mode="bilinear", align_corners=False)
    return resized.flatten(2).transpose(1, 2).to(patches.dtype)


# -- the objective -------------------------------------------------------------------------------------------------
class VQKDParams(ObjectiveParams):
    teacher: TeacherSpec = Field(description="the frozen feature teacher (maskray.teacher_sources)")
    num_codes: int = Field(256, ge=2, description="codebook size K (paper: 8192)")
    code_dim: int = Field(32, gt=0, description="code dimension d")
    decay: float = Field(0.99, ge=0.0, le=1.0, description="codebook EMA decay")
    beta: float = Field(1.0, ge=0.0, description="commitment loss weight")
    kmeans_iters: int = Field(10, ge=0, description="k-means iterations of the codebook initialisation")
    restart_after: int = Field(20, ge=0, description="restart a code unused for this many forwards (0: never)")
    decoder_dim: int = Field(128, gt=0, description="decoder width")
    decoder_depth: int = Field(1, gt=0, description="decoder blocks")
    decoder_heads: int = Field(4, gt=0, description="decoder attention heads")


@register_objective("vqkd")
class VQKD(Objective):
    Config = VQKDParams

    def __init__(self, encoder: MaskedViT, params: VQKDParams) -> None:
        super().__init__(encoder, params)
        self.teacher_size = params.teacher.img_size or encoder.cfg.img_size
        self.teacher = build_teacher(params.teacher, self.teacher_size)
        self.encode_task = task_layer(encoder.embed_dim, params.code_dim)
        self.quantizer = NormEMAQuantizer(params.num_codes, params.code_dim, params.decay, params.beta,
                                          params.kmeans_iters, params.restart_after)
        self.decoder = CodeDecoder(params.code_dim, encoder.grid_size, self.teacher.module.embed_dim,
                                   params.decoder_dim, params.decoder_depth, params.decoder_heads)

    def inputs(self, model, data):
        from maskray.data.transforms import ImageTransform
        from maskray.data.views import SharedCrop, Views

        return Views(crop=SharedCrop(ImageTransform.for_training(model, data)))

    def passes(self) -> dict[str, EncoderPass]:
        return {"tokens": EncoderPass("crop.0")}

    def loss(self, batch: dict[str, Any], outputs: dict[str, PassOutput], ctx: StepContext) -> ObjectiveOutput:
        """batch["crop"]: [normalised (B, C, H, W), pixels in [0, 1] (B, C, H, W)]; outputs["tokens"]: the encoder
        on the normalised crop."""
        tokens = outputs["tokens"].out.patches  # (B, L, D)
        batch_size, length, _ = tokens.shape
        quantized = self.quantizer(self.encode_task(tokens).flatten(0, 1), ctx.generator)
        rec = self.decoder(quantized.quantized.view(batch_size, length, -1).to(tokens.dtype))  # (B, L, Dt)
        target = teacher_patches(self.teacher, batch["crop"][1], self.teacher_size, self.encoder.grid_size)
        reconstruction = (1.0 - F.cosine_similarity(rec.float(), target.float(), dim=-1)).mean()
        counts = quantized.counts
        metrics = {
            "reconstruction": reconstruction.detach(),
            "commitment": quantized.commitment.detach(),
            "codebook_perplexity": codebook_perplexity(counts),
            "codebook_used": (counts > 0).sum().float(),
        }
        return ObjectiveOutput(reconstruction + quantized.commitment, metrics)

    def tokenizer(self, mean: tuple[float, ...], std: tuple[float, ...]) -> VQKDTokenizer:
        """The trained tokenizer (sharing this objective's modules) for images normalised with ``mean`` / ``std``."""
        return VQKDTokenizer(self.encoder, self.encode_task, self.quantizer, mean, std)

    def export_artifacts(self, directory: Path, config) -> None:
        """The tokenizer, as ``<directory>/tokenizer`` (:func:`save_tokenizer`), with the run's normalisation."""
        mean, std = channel_stats(config.data.mean, config.data.std, config.model.in_chans)
        save_tokenizer(directory / ARTIFACT, self.tokenizer(mean, std))

