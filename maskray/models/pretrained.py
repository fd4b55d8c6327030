"""Start an encoder from released weights (``model.init_from``): read a local file, map it to timm's keys, load.

Formats, told apart by their keys (:func:`detect_format`):

- ``timm``: a timm state dict (also maskray's own export, ``launch/export.py``); a classifier (``head.*``) is dropped;
- ``mae``: a facebookresearch/mae checkpoint (``{"model": ...}``; timm's keys plus ``decoder_*`` and
  ``mask_token``, which are dropped);
- ``hf_vitmae``: a Hugging Face ``ViTMAEModel`` / ``ViTMAEForPreTraining`` state dict, in the layout the hub's
  files use (``encoder.layer.N.attention.attention.query``, ...) or in transformers 5's module names
  (``layers.N.attention.q_proj``, ...); query, key and value are concatenated into timm's ``qkv``, the decoder
  is dropped. The encoder keeps timm's LayerNorm eps (1e-6, MAE's); HF configs default to 1e-12, so features
  match HF's exactly only for ``layer_norm_eps=1e-6`` (with 1e-12 they differ slightly).

Files are ``.safetensors`` or a pickle (``.pth``, ``.pt``, ``.bin``) loaded with ``torch.load(weights_only=True)``
(one holding anything but tensors and plain containers is refused); a ``model`` or ``state_dict`` entry is
unwrapped. The file's absolute position table is always used: resampled to the encoder's grid (bicubic, CLS slot
kept, timm's ``resample_abs_pos_embed``) when the file was trained at another image size. ``model.pos_embed``
decides only whether it is trained on: ``sincos`` keeps it fixed (a sin-cos file at the same grid keeps its exact
table, a file with learned positions keeps those, frozen), ``learned`` trains it. Heads and the encoder's mask token are
not part of the file: objectives build them fresh.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from maskray.errors import ConfigError
from maskray.models.vit import MaskedViT
from maskray.storage import open_input

KEY = "model.init_from"
StateDict = dict[str, torch.Tensor]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (a local path or a filesystem URI, :mod:`maskray.storage`)."""
    digest = hashlib.sha256()
    with open_input(os.fspath(path)) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path, key: str = KEY) -> StateDict:
    """The tensors of a ``.safetensors`` file or a ``weights_only`` pickle (``model`` / ``state_dict`` unwrapped);
    ConfigError naming ``key`` (default ``model.init_from``) and the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"key '{key}': no such file '{path}'")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise ConfigError(f"key '{key}': '{path}' is not a readable safetensors file ({err})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"key '{key}': '{path}' is refused by torch.load(weights_only=True): "
                          f"{_unpickler_reason(str(err))}") from None
    except (RuntimeError, EOFError) as err:
        raise ConfigError(f"key '{key}': '{path}' is not a readable checkpoint ({str(err).splitlines()[0]})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"key '{key}': '{path}' holds no state dict")
    for name, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"key '{key}': '{path}' entry '{name}' is a {type(value).__name__}, not a tensor")
    return data


def _unpickler_reason(message: str) -> str:
    """The one-line reason in torch's multi-line weights-only refusal (``Unsupported global: GLOBAL x.Y``)."""
    tail = message.partition("WeightsUnpickler error:")[2]
    line = next((line.strip() for line in tail.splitlines() if line.strip()), "not a weights-only pickle")
    return line.split(" was not an allowed global")[0]


def timm_checkpoint_filter_fn(state: StateDict) -> StateDict:
    """A timm (or maskray export) state dict for ``num_classes=0``: the classifier ``head.*`` dropped."""
    return {key: value for key, value in state.items() if not key.startswith("head.")}


def mae_checkpoint_filter_fn(state: StateDict) -> StateDict:
    """facebookresearch/mae ``models_mae.py`` keys -> timm's: the encoder's are timm's already; ``decoder_*`` and
    ``mask_token`` (the decoder's) are dropped."""
    return {key: value for key, value in state.items() if not key.startswith("decoder_") and key != "mask_token"}


# Hugging Face ViTMAE -> timm, after the ``vit.`` prefix is stripped; both the hub's (transformers 4) names and
# transformers 5's module names. Query / key / value map to slot 0 / 1 / 2 of timm's fused ``qkv``.
_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (_LAYER + r"attention\.(?:attention\.query|q_proj)\.(weight|bias)", r"blocks.\1.attn.qkv.\2#0"),
    (_LAYER + r"attention\.(?:attention\.key|k_proj)\.(weight|bias)", r"blocks.\1.attn.qkv.\2#1"),
    (_LAYER + r"attention\.(?:attention\.value|v_proj)\.(weight|bias)", r"blocks.\1.attn.qkv.\2#2"),
    (_LAYER + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_LAYER + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_LAYER + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (_LAYER + r"layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_LAYER + r"layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)


def hf_vitmae_checkpoint_filter_fn(state: StateDict) -> StateDict:
    """Hugging Face ViTMAE keys -> timm's; the decoder is dropped, an unknown key is kept as it is (so the strict
    load names it)."""
    out: StateDict = {}
    qkv: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        name = key.removeprefix("vit.")
        if name.startswith("decoder."):
            continue
        for pattern, replacement in _HF_RENAMES:
            if re.fullmatch(pattern, name):
                name = re.sub(pattern, replacement, name)
                break
        else:
            out[key] = value
            continue
        if "#" in name:
            target, slot = name.split("#")
            qkv.setdefault(target, {})[int(slot)] = value
        else:
            out[name] = value
    for target, parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            missing = ("query", "key", "value")[min(set(range(3)) - set(parts))]
            raise ConfigError(f"key '{KEY}': Hugging Face checkpoint lacks the {missing} of '{target}'")
        out[target] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


FILTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "timm": timm_checkpoint_filter_fn,
    "mae": mae_checkpoint_filter_fn,
    "hf_vitmae": hf_vitmae_checkpoint_filter_fn,
}


def detect_format(state: StateDict) -> str:
    """``hf_vitmae`` (HF embeddings keys), ``mae`` (decoder keys or ``mask_token`` beside timm's), else ``timm``."""
    if any(key.removeprefix("vit.").startswith("embeddings.patch_embeddings.") for key in state):
        return "hf_vitmae"
    if any(key.startswith("decoder_") or key == "mask_token" for key in state):
        return "mae"
    return "timm"


def resample_pos_embed(
    state: StateDict, encoder: MaskedViT, key: str = KEY
) -> tuple[StateDict, tuple[int, int] | None]:
    """``pos_embed`` (1, 1 + g*g, D) of a square g x g grid resampled to the encoder's grid when only its length
    differs (bicubic, CLS slot kept); returns the state and (g, g), or ``state`` unchanged and None."""
    table, own = state.get("pos_embed"), encoder.vit.pos_embed
    if table is None or own is None or table.shape == own.shape or table.shape[-1] != own.shape[-1]:
        return state, None
    side = math.isqrt(table.shape[1] - 1)
    if table.ndim != 3 or side * side != table.shape[1] - 1:
        raise ConfigError(f"key '{key}': pos_embed {tuple(table.shape)} is not a CLS slot plus a square grid")
    resampled = resample_abs_pos_embed(table.float(), new_size=list(encoder.grid_size), old_size=[side, side])
    return {**state, "pos_embed": resampled}, (side, side)


def first_mismatch(expected: StateDict, state: StateDict) -> str | None:
    """The first problem loading ``state`` into a module whose state dict is ``expected`` (in the module's order): a
    missing or wrongly-shaped key, else the first unexpected key (in natural order: ``blocks.2`` before
    ``blocks.10``; files do not keep an order, safetensors sorts); None when they match."""
    for key, value in expected.items():
        if key not in state:
            return f"missing key '{key}'"
        if state[key].shape != value.shape:
            return f"key '{key}' has shape {tuple(state[key].shape)}, the encoder's is {tuple(value.shape)}"
    unexpected = sorted((key for key in state if key not in expected), key=_natural)
    return f"unexpected key '{unexpected[0]}'" if unexpected else None


def _natural(key: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


@dataclass(frozen=True)
class InitFrom:
    """What :func:`load_pretrained` loaded: the file, its sha256, the detected format, and the file's position
    grid when it was resampled (else None)."""

    path: Path
    sha256: str
    format: str
    resampled_from: tuple[int, int] | None


def load_pretrained(encoder: MaskedViT, path: str | Path, key: str = KEY) -> InitFrom:
    """Load the weights of ``path`` into ``encoder.vit`` (strictly, after mapping and resampling); ConfigError
    naming ``key`` (default ``model.init_from``), the file and the first bad key when the file does not fit the
    architecture."""
    path = Path(path)
    raw = read_state_dict(path, key)
    kind = detect_format(raw)
    mapped = FILTERS[kind](raw)
    state, grid = resample_pos_embed(mapped, encoder, key)
    expected = encoder.vit.state_dict()
    problem = first_mismatch(expected, state)
    if problem:
        raise ConfigError(f"key '{key}': '{path}' ({kind}) does not fit the {encoder.arch} encoder "
                          f"(depth {encoder.depth}, width {encoder.embed_dim}): {problem}")
    encoder.vit.load_state_dict(state, strict=True)
    return InitFrom(path, file_sha256(path), kind, grid)
