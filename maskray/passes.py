"""Encoder passes: an objective declares which (view, mask) it needs the backbone to run; the core runs each
distinct pass once per micro-batch and hands the outputs to the objective (or to every part of a composite).

A view is a path into the batch: ``"image"``, ``"views.1"`` (item 1 of the list ``batch["views"]``),
``"anchors.focal.0"``, ``"frames.1"`` (frame 1 of a stacked (B, T, C, H, W) tensor such as a
:class:`~maskray.data.views.FramePair`: an index into a tensor picks along dim 1, the batch dim stays).
Masks (spec ``objectives.md`` section 1.2):

- ``MaskSpec("random", ratio=r)``: MAE's per-sample noise ranking, the noise drawn from the rank's step generator.
  Random masks with the same ``noise`` name (on views with the same patch count) share one draw; ``chunk=c`` keeps
  the ranks ``[c*K, (c+1)*K)`` of that draw instead of the first K, so ``chunk=0`` and ``chunk=1`` give LUT's two
  disjoint visible sets;
- ``MaskSpec("batch", key=k)``: a mask the loader made, ``batch[k]`` (B, L) with 1 = masked (block-wise masks);
- ``mode="drop"``: the encoder sees only the visible patches (MAE); ``mode="replace"``: every position, masked
  ones as the encoder's mask token (BEiT, SimMIM). A drop mask from the loader must hide the same number of
  patches in every sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from maskray.masking import MaskIndices, num_visible, random_mask_indices
from maskray.models import EncoderOutput, MaskedViT


@dataclass(frozen=True)
class MaskSpec:
    """How a pass masks its view; see the module docstring."""

    kind: Literal["random", "batch"]
    mode: Literal["drop", "replace"] = "drop"
    ratio: float = 0.75
    noise: str = "noise"
    chunk: int = 0
    key: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("random", "batch") or self.mode not in ("drop", "replace"):
            raise ValueError(f"MaskSpec: kind must be random|batch and mode drop|replace, got {self.kind}/{self.mode}")
        if self.kind == "batch" and not self.key:
            raise ValueError("MaskSpec('batch') needs the batch key of the mask")
        if self.kind == "random":
            num_visible(1000, self.ratio)  # validates the ratio
            if self.chunk < 0:
                raise ValueError(f"MaskSpec: chunk must be >= 0, got {self.chunk}")


@dataclass(frozen=True)
class EncoderPass:
    """One backbone call: ``view`` (a batch path), ``mask`` (None: unmasked), block outputs ``layers`` to return
    and whether to return attention maps. Passes with the same (view, mask) are run once."""

    view: str = "image"
    mask: MaskSpec | None = None
    layers: tuple[int, ...] = ()
    attn: bool = False

    @property
    def key(self) -> tuple[str, MaskSpec | None]:
        return self.view, self.mask


@dataclass
class PassOutput:
    """out: the encoder's output; mask: (B, L) float, 1 = masked, in image order (None unmasked); indices: the
    random masking's ids_keep / ids_restore (drop and random masks; ``ids_restore`` puts the kept-first order
    back in image order, as the MAE decoder needs)."""

    out: EncoderOutput
    mask: torch.Tensor | None = None
    indices: MaskIndices | None = None


def select(batch: dict[str, Any], path: str) -> Any:
    """The batch entry at a dotted path (dict keys, list indices, and indices along dim 1 of a batched tensor),
    KeyError naming the path if absent."""
    node: Any = batch
    for part in path.split("."):
        try:
            if isinstance(node, torch.Tensor):
                if node.ndim < 2 or not -node.shape[1] <= int(part) < node.shape[1]:
                    raise IndexError(part)
                node = node[:, int(part)]
            else:
                node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
        except (KeyError, IndexError, ValueError):
            raise KeyError(f"the batch has no entry '{path}' (missing '{part}')") from None
    return node


def _chunk_indices(noise: torch.Tensor, num_keep: int, chunk: int) -> MaskIndices:
    """Keep the noise ranks ``[chunk*K, (chunk+1)*K)``: re-rank so that block first, then mask as usual."""
    if chunk == 0:
        return random_mask_indices(noise, num_keep)
    length = noise.shape[1]
    if (chunk + 1) * num_keep > length:
        raise ValueError(f"MaskSpec chunk {chunk} of {num_keep} visible patches exceeds the {length} patches")
    ranks = torch.argsort(torch.argsort(noise, dim=1, stable=True), dim=1)
    return random_mask_indices(((ranks - chunk * num_keep) % length).to(noise.dtype), num_keep)


def _batch_mask_indices(mask: torch.Tensor) -> MaskIndices:
    """Drop indices from a loader mask (B, L), 1 = masked: visible patches first, in image order."""
    hidden = mask.sum(dim=1)
    if not torch.all(hidden == hidden[0]):
        raise ValueError("a drop-mode mask from the batch must hide the same number of patches in every sample")
    length = mask.shape[1]
    order = mask.float() * length + torch.arange(length, device=mask.device, dtype=torch.float32)
    return random_mask_indices(order, length - int(hidden[0]))


def run_passes(
    encoder: MaskedViT, batch: dict[str, Any], passes: dict[str, EncoderPass], generator: torch.Generator | None
) -> dict[str, PassOutput]:
    """Run every distinct (view, mask) of ``passes`` once; returns ``{pass name: output}`` (shared outputs for
    passes with the same key). Returned layers are the union of what passes with that key asked for."""
    wanted: dict[tuple, tuple[set[int], bool]] = {}
    for spec in passes.values():
        layers, attn = wanted.get(spec.key, (set(), False))
        wanted[spec.key] = (layers | set(spec.layers), attn or spec.attn)
    noises: dict[tuple[str, int, int], torch.Tensor] = {}
    results: dict[tuple, PassOutput] = {}
    for (view, mask), (layers, attn) in wanted.items():
        images = select(batch, view)
        patch = encoder.patch_size
        batch_size, length = images.shape[0], (images.shape[-2] // patch) * (images.shape[-1] // patch)
        kwargs: dict[str, Any] = {"return_layers": tuple(sorted(layers)), "return_attn": attn}
        indices = hidden = None
        if mask is not None:
            if mask.kind == "random":
                noise_key = (mask.noise, batch_size, length)
                if noise_key not in noises:
                    noises[noise_key] = torch.rand(batch_size, length, generator=generator, device=images.device)
                indices = _chunk_indices(noises[noise_key], num_visible(length, mask.ratio), mask.chunk)
                hidden = indices.mask
            else:
                hidden = select(batch, mask.key).to(images.device).float()
                if mask.mode == "drop":
                    indices = _batch_mask_indices(hidden)
            if mask.mode == "drop":
                kwargs["ids_keep"] = indices.ids_keep
            else:
                kwargs["replace_mask"] = hidden
        results[(view, mask)] = PassOutput(encoder(images, **kwargs), hidden, indices)
    return {name: results[spec.key] for name, spec in passes.items()}
