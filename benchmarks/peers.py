"""The MAE of each library at one architecture, for ``peers_step.py`` and ``peers_quality.py``.

- ``maskray``: its real path, the one ``launch/pretrain.py`` runs: ``build_encoder`` + the registered ``mae``
  objective in a DeepSpeed engine (``train.zero_stage`` auto: stage 0 for this one worker; ``train.precision``),
  stepped by the worker's ``optimizer_step``.
- ``hf``: ``transformers.ViTMAEForPreTraining`` (SDPA attention, ``norm_pix_loss``), ``torch.optim.AdamW``.
- ``lightly``: lightly's MAE building blocks as its MAE example assembles them: ``MaskedVisionTransformerTIMM`` over
  a timm ViT, ``MAEDecoderTIMM``, ``random_token_mask`` / ``set_at_index`` / ``get_at_index`` / ``patchify``; the
  target normalised per patch (``normalize_mean_var``, the norm-pix loss) and an MSE over the removed patches;
  ``torch.optim.AdamW``.

The peers run bf16 as their users do, under ``torch.autocast`` with fp32 weights; maskray under DeepSpeed's bf16
mode (bf16 weights, fp32 master weights in the optimizer). All three: AdamW (0.9, 0.95), weight decay 0.05 (torch's
fused kernel for all three on CUDA). ``device``: CPU (DeepSpeed's CPU accelerator, a gloo group) or CUDA (its CUDA
accelerator, an NCCL group); set ``DS_ACCELERATOR`` before DeepSpeed is imported (``init_process_group`` does).
Nothing here imports Ray or MLflow (the GPU suite runs it on a machine without them).
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskray.config import Config, load_config  # noqa: E402
from maskray.context import RankRandomness, StepContext  # noqa: E402
from maskray.models import build_encoder  # noqa: E402
from maskray.objective import Objective, build_objective  # noqa: E402

LIBRARIES = ("maskray", "hf", "lightly")
# what each library's step imports before it builds a model (``import_library``)
LIBRARY_MODULES = {
    "maskray": ("timm", "deepspeed", "maskray.engine.deepspeed_setup", "maskray.engine.step"),
    "hf": ("timm", "transformers.models.vit_mae.modeling_vit_mae"),
    "lightly": ("timm", "lightly.models.modules", "lightly.models.utils"),
}
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Arch:
    """A ViT encoder + MAE decoder; ``timm`` is the encoder's timm name (its width, heads, MLP ratio)."""

    timm: str
    img_size: int
    patch_size: int
    depth: int
    embed_dim: int
    heads: int
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


ARCHS = {
    "vit_s16": Arch("vit_small_patch16_224", 224, 16, 12, 384, 6),
    "vit_b16": Arch("vit_base_patch16_224", 224, 16, 12, 768, 12),
    # the demo's: configs/demo/mae.yaml (ViT-Tiny width, 4 blocks, 16x16 images of 4x4 patches, 2 x 128 decoder)
    "demo": Arch("vit_tiny_patch16_224", 16, 4, 4, 192, 3, decoder_dim=128, decoder_depth=2, decoder_heads=4),
}


def maskray_config(arch: Arch, batch: int, precision: str, steps: int, lr: float, extra: tuple[str, ...] = ()
                   ) -> Config:
    """maskray's config of the MAE at ``arch``; ``extra``: more ``key=value`` overrides (``train.zero_stage=2``)."""
    return load_config(None, [
        f"model.arch={arch.timm}", f"model.img_size={arch.img_size}", f"model.patch_size={arch.patch_size}",
        f"model.depth={arch.depth}", "objective.name=mae", f"objective.mask_ratio={arch.mask_ratio}",
        "objective.norm_pix=true", f"objective.decoder_dim={arch.decoder_dim}",
        f"objective.decoder_depth={arch.decoder_depth}", f"objective.decoder_heads={arch.decoder_heads}",
        f"data.batch_size={batch}", f"train.steps={steps}", f"optim.lr={lr}",
        f"train.precision={precision}", *extra,
    ])


def init_process_group(device: torch.device = CPU) -> None:
    """A world-size-1 group for DeepSpeed in this process (once): gloo on CPU, NCCL on CUDA."""
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed("nccl" if device.type == "cuda" else "gloo")


class MaskrayStep:
    """maskray's worker step: ``optimizer_step`` on the DeepSpeed engine of the ``mae`` objective."""

    def __init__(self, arch: Arch, batch: int, precision: str, steps: int = 1000, lr: float = 1.5e-4,
                 seed: int = 0, warmup: int = 0, device: torch.device = CPU, extra: tuple[str, ...] = ()) -> None:
        init_process_group(device)
        from maskray.engine.deepspeed_setup import build_engine, use_bf16

        self.device = device
        self.config = maskray_config(arch, batch, precision, steps, lr, (f"optim.warmup_steps={warmup}",
                                                                         f"train.seed={seed}", *extra))
        torch.manual_seed(seed)
        self.objective: Objective = build_objective("mae", self.config.objective.params,
                                                    build_encoder(self.config.model))
        bf16 = use_bf16(self.config, device)
        self.engine = build_engine(self.objective, self.config, world_size=1, bf16=bf16)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.randomness = RankRandomness(seed, 0, device)  # the masks' generator on the images' device
        self.step_index = 0

    def __call__(self, images: torch.Tensor) -> float:
        from maskray.engine.step import optimizer_step

        batch = {"image": images, "key": [""] * images.shape[0], "label": torch.zeros(images.shape[0])}
        ctx = StepContext(self.step_index, self.config.train.steps, generator=self.randomness.generator)
        self.step_index += 1
        return optimizer_step(self.engine, self.objective, iter([batch]), ctx, 1, self.device, self.dtype).loss

    def encoder(self) -> nn.Module:
        return self.objective.encoder


def hf_model(arch: Arch) -> nn.Module:
    import transformers

    config = transformers.ViTMAEConfig(
        hidden_size=arch.embed_dim, num_hidden_layers=arch.depth, num_attention_heads=arch.heads,
        intermediate_size=4 * arch.embed_dim, image_size=arch.img_size, patch_size=arch.patch_size, qkv_bias=True,
        layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        decoder_hidden_size=arch.decoder_dim, decoder_num_hidden_layers=arch.decoder_depth,
        decoder_num_attention_heads=arch.decoder_heads, decoder_intermediate_size=4 * arch.decoder_dim,
        mask_ratio=arch.mask_ratio, norm_pix_loss=True, attn_implementation="sdpa",
    )
    return transformers.ViTMAEForPreTraining(config)


class LightlyMAE(nn.Module):
    """lightly's MAE (its ``examples/pytorch/mae.py``) with the norm-pix target."""

    def __init__(self, arch: Arch) -> None:
        import timm
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

        super().__init__()
        vit = timm.create_model(arch.timm, img_size=arch.img_size, patch_size=arch.patch_size, depth=arch.depth,
                                num_classes=0, dynamic_img_size=False)
        self.mask_ratio, self.patch_size = arch.mask_ratio, arch.patch_size
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, patch_size=arch.patch_size, embed_dim=vit.embed_dim,
            decoder_embed_dim=arch.decoder_dim, decoder_depth=arch.decoder_depth, decoder_num_heads=arch.decoder_heads,
            mlp_ratio=4.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
        )

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, C, H, W) -> the loss; ``noise`` (B, L) ranks the patches as maskray's masks do (else
        ``random_token_mask``)."""
        from lightly.models import utils

        batch = images.shape[0]
        if noise is None:
            idx_keep, idx_mask = utils.random_token_mask(size=(batch, self.sequence_length),
                                                         mask_ratio=self.mask_ratio, device=images.device)
        else:  # random_token_mask's rule (CLS kept, int(L * (1 - ratio)) patches kept) on the given noise
            keep = int(noise.shape[1] * (1 - self.mask_ratio)) + 1
            order = torch.argsort(torch.cat([noise.new_full((batch, 1), -1.0), noise], dim=1), dim=1)
            idx_keep, idx_mask = order[:, :keep], order[:, keep:]
        x_encoded = self.backbone.encode(images=images, idx_keep=idx_keep)
        x_decode = self.decoder.embed(x_encoded)
        x_masked = utils.repeat_token(self.decoder.mask_token, (batch, self.sequence_length))
        x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_decoded = self.decoder.decode(x_masked)
        x_pred = self.decoder.predict(utils.get_at_index(x_decoded, idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        var = target.var(dim=-1, keepdim=True)  # the norm-pix target (unbiased variance, as MAE)
        target = (target - target.mean(dim=-1, keepdim=True)) / (var + 1e-6).sqrt()
        return nn.functional.mse_loss(x_pred.float(), target.float())


class PeerStep:
    """zero_grad + forward (under bf16 autocast for ``bf16``) + loss + backward + AdamW for ``hf`` / ``lightly``."""

    def __init__(self, library: str, arch: Arch, precision: str, lr: float = 1.5e-4, seed: int = 0,
                 warmup: int = 0, steps: int = 1000, device: torch.device = CPU) -> None:
        from maskray.schedules import warmup_cosine

        torch.manual_seed(seed)
        self.library = library
        self.model = hf_model(arch) if library == "hf" else LightlyMAE(arch)
        self.model.to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05,
                                           fused=device.type == "cuda" or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, 1.0, steps, warmup, 0.0))
        self.autocast: Any = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                              else nullcontext())

    def __call__(self, images: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.model(pixel_values=images).loss if self.library == "hf" else self.model(images)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach().float().item()

    def encoder(self) -> nn.Module:
        return self.model.vit if self.library == "hf" else self.model.backbone


def import_library(library: str) -> None:
    """Import the modules ``library``'s step needs (``LIBRARY_MODULES``), so that what a process holds after this
    is the library's code and what it adds later is the training's own memory."""
    for module in LIBRARY_MODULES[library]:
        importlib.import_module(module)


def build_step(library: str, arch: Arch, batch: int, precision: str, **kwargs):
    if library == "maskray":
        return MaskrayStep(arch, batch, precision, **kwargs)
    return PeerStep(library, arch, precision, **kwargs)


# --- the same weights in every library -----------------------------------------------------------------------------
def maskray_objective(arch: Arch) -> Objective:
    """The ``mae`` objective at ``arch`` outside an engine (fp32)."""
    config = maskray_config(arch, 2, "fp32", 1, 1e-4)
    return build_objective("mae", config.objective.params, build_encoder(config.model))


def _hf_decoder_to_maskray(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``decoder.*`` keys (transformers 5 names) -> ``MAEDecoder``'s (fused qkv, timm ``Block`` names)."""
    names = {"decoder_embed": "embed", "decoder_norm": "norm", "decoder_pred": "pred", "mask_token": "mask_token",
             "decoder_pos_embed": "pos_embed", "attention.o_proj": "attn.proj", "layernorm_before": "norm1",
             "layernorm_after": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith("decoder."):
            continue
        name = key.removeprefix("decoder.").replace("decoder_layers.", "blocks.")
        if any(f"attention.{part}_proj" in name for part in "qkv"):
            if "attention.q_proj" in name:
                fused = name.replace("attention.q_proj", "attn.qkv")
                out[fused] = torch.cat([state[key.replace("q_proj", part)] for part in ("q_proj", "k_proj", "v_proj")])
            continue
        for old, new in names.items():
            if old in name:
                name = name.replace(old, new)
                break
        out[name] = value
    return out


def copy_hf_into_maskray(model: nn.Module, objective: Objective) -> None:
    """HF ViTMAE's weights (and fixed position tables) into the ``mae`` objective."""
    from maskray.models.pretrained import hf_vitmae_checkpoint_filter_fn

    state = model.state_dict()
    encoder = hf_vitmae_checkpoint_filter_fn({k: v for k, v in state.items() if k.startswith("vit.")})
    missing, unexpected = objective.encoder.vit.load_state_dict(encoder, strict=False)
    if unexpected or any(not key.startswith("head") for key in missing):
        raise RuntimeError(f"HF -> maskray encoder: missing {missing}, unexpected {unexpected}")
    decoder = _hf_decoder_to_maskray(state)
    with torch.no_grad():
        objective.decoder.pos_embed.copy_(decoder.pop("pos_embed"))
    objective.decoder.load_state_dict(decoder, strict=True)


def copy_maskray_into_lightly(objective: Objective, model: LightlyMAE) -> None:
    """The ``mae`` objective's weights into lightly's MAE (both encoders are timm ViTs, both decoders timm blocks)."""
    missing, unexpected = model.backbone.vit.load_state_dict(objective.encoder.vit.state_dict(), strict=False)
    if unexpected or any(not key.startswith("head") for key in missing):
        raise RuntimeError(f"maskray -> lightly encoder: missing {missing}, unexpected {unexpected}")
    decoder = {("decoder_" + key if key.split(".")[0] in ("embed", "blocks", "norm", "pred") else key): value
               for key, value in objective.decoder.state_dict().items()}
    decoder["decoder_pos_embed"] = objective.decoder.pos_embed
    model.decoder.load_state_dict(decoder, strict=True)


def same_weights_losses(arch: Arch, batch: int = 2, seed: int = 0, device: torch.device = CPU,
                        precision: str = "fp32") -> dict[str, float]:
    """First-step losses of the three libraries on the same images, weights and mask (HF's weights copied into
    maskray, maskray's into lightly), on ``device``, fp32 or under bf16 autocast; the mask is ranked from the noise
    that maskray's ``random`` pass draws (a generator on ``device``)."""
    torch.manual_seed(seed)
    hf = hf_model(arch).train().to(device)
    objective = maskray_objective(arch).train().to(device)
    copy_hf_into_maskray(hf, objective)
    lightly = LightlyMAE(arch).train().to(device)
    copy_maskray_into_lightly(objective, lightly)
    images = torch.randn(batch, 3, arch.img_size, arch.img_size, generator=torch.Generator().manual_seed(seed + 1))
    images = images.to(device)
    draws = lambda: torch.Generator(device=device).manual_seed(seed + 2)  # noqa: E731
    noise = torch.rand(batch, arch.num_patches, generator=draws(), device=device)
    ctx = StepContext(0, 1, generator=draws())  # draws the same noise
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with torch.no_grad(), autocast:
        return {
            "maskray": objective({"image": images}, ctx).loss.float().item(),
            "hf": hf(pixel_values=images, noise=noise).loss.float().item(),
            "lightly": lightly(images, noise).float().item(),
        }
