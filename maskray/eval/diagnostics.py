"""Diagnostics of "What do self-supervised ViTs learn?" (Park et al., ICLR 2023) on a frozen encoder.

All three follow the objectives spec, section 8.4; attention maps (B, H, 1+N, 1+N) come from
``MaskedViT.forward(return_attn=True)``, the CLS row and column are dropped first.

- **Mean attention distance** (pixels): ``sum_j A_ij * patch_size * ||cell_i - cell_j||``, averaged over queries
  and images, per head. Uniform attention on a 14x14 grid with 16-pixel patches gives 116.49 px, identity 0.
- **NMI** between query and key: ``MI(q; k) / sqrt(H(q) H(k))`` with p(q) uniform and p(k|q) = A_qk; 1 for
  identity attention, 0 when every query attends the same way ("attention collapse").
- **Fourier analysis** of token maps: the log amplitude of the 2-D FFT of each channel's (h, w) map, averaged
  over images and channels, read along the diagonal from the DC term outward; the value reported is the
  highest included diagonal frequency minus the DC value ("delta log amplitude"). Negative: low-pass.

Layer numbering (metrics, JSON and figures): **layer i = output of block i, 1-based** (``l1`` .. ``lL``), and
``l0`` is the patch embedding (with positions), which only the Fourier measure has. Metric names:
``diag_attn_dist_l{i}`` and ``diag_nmi_l{i}`` (mean over heads; the per-head values go into the JSON artifact)
and ``diag_fourier_l{i}``, logged at the checkpoint's training step, so two runs compare layer by layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from maskray.models import MaskedViT

METRIC_PREFIXES = {"attn_dist": "diag_attn_dist_l", "nmi": "diag_nmi_l", "fourier": "diag_fourier_l"}


def _patch_attention(attn: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, 1+N, 1+N) or (B, H, N, N) -> (B, H, N, N) float64 without the CLS row and column."""
    num_patches = grid[0] * grid[1]
    if attn.shape[-1] == num_patches + 1:
        attn = attn[..., 1:, 1:]
    elif attn.shape[-1] != num_patches:
        raise ValueError(f"attention over {attn.shape[-1]} tokens does not fit a {grid[0]}x{grid[1]} grid")
    return attn.double()


def patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(N, N) Euclidean distances in pixels between the patch cells of a row-major (h, w) grid."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    cells = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()
    return torch.cdist(cells, cells) * patch_size


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """attn: (B, H, 1+N, 1+N) or (B, H, N, N) probabilities -> (H,) mean attention distance in pixels.

    Rows are renormalised after dropping CLS (``+ 1e-32`` keeps all-CLS rows finite).
    """
    attn = _patch_attention(attn, grid) + 1e-32
    attn = attn / attn.sum(dim=-1, keepdim=True)
    distance = (attn * patch_distances(grid, patch_size).to(attn.device)).sum(dim=-1)  # (B, H, N)
    return distance.mean(dim=(0, 2))


def attention_nmi(attn: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """attn: (B, H, 1+N, 1+N) or (B, H, N, N) -> (H,) normalised mutual information of query and key.

    p(q) = 1/Q, p(k) = sum_q p(q) A_qk, MI = sum_qk p(q) A_qk log(A_qk / p(k)), NMI = MI / sqrt(H(q) H(k)),
    computed per image and head on ``A + 1e-8`` renormalised, then averaged over images.
    """
    attn = _patch_attention(attn, grid) + 1e-8
    attn = attn / attn.sum(dim=-1, keepdim=True)
    queries = attn.shape[-2]
    p_key = attn.mean(dim=-2)  # (B, H, N)
    mutual = (attn * (attn / p_key.unsqueeze(-2)).log()).sum(dim=(-2, -1)) / queries
    entropy_key = -(p_key * p_key.log()).sum(dim=-1)
    return (mutual / torch.sqrt(math.log(queries) * entropy_key)).mean(dim=0)


def fourier_high_freq(tokens: torch.Tensor, grid: tuple[int, int]) -> float:
    """tokens: (B, N, C) or (B, 1+N, C) -> delta log amplitude at the highest included diagonal frequency.

    ``log(|FFT2| + 1e-6)`` of every (h, w) channel map, DC shifted to the centre (h // 2, w // 2), mean over
    B and C, diagonal from the centre outward (indices h // 2 .. h - 1 for a square grid: frequencies
    0 .. (h/2 - 1) * 2pi/h; the Nyquist bin wraps and is excluded); returns last entry minus the DC entry.
    White noise gives about +0.35 (E log|.| of the real DC bin is lower than that of the complex ones), a constant
    non-zero map the floor ``log(1e-6) - log(N |c| + 1e-6)``.
    """
    height, width = grid
    if tokens.shape[1] == height * width + 1:
        tokens = tokens[:, 1:]
    elif tokens.shape[1] != height * width:
        raise ValueError(f"{tokens.shape[1]} tokens do not fit a {height}x{width} grid")
    maps = tokens.double().transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)
    amplitude = torch.log(torch.fft.fft2(maps).abs() + 1e-6)
    amplitude = torch.fft.fftshift(amplitude, dim=(-2, -1)).mean(dim=(0, 1))  # (h, w), DC at the centre
    steps = torch.arange(min(height - height // 2, width - width // 2))
    diagonal = amplitude[height // 2 + steps, width // 2 + steps]
    return float(diagonal[-1] - diagonal[0])


@dataclass
class Diagnostics:
    """Per-layer diagnostics of one encoder on one set of images.

    attn_dist: (L, H) pixels and nmi: (L, H), row i-1 = layer i (block i's attention);
    fourier: (L+1,), entry 0 = patch embedding, entry i = output of block i.
    """

    attn_dist: np.ndarray
    nmi: np.ndarray
    fourier: np.ndarray

    def metrics(self) -> dict[str, float]:
        """``diag_attn_dist_l{i}`` / ``diag_nmi_l{i}`` (head mean, i = 1..L) and ``diag_fourier_l{i}`` (0..L)."""
        metrics: dict[str, float] = {}
        for layer, (dist, nmi) in enumerate(zip(self.attn_dist, self.nmi, strict=True), start=1):
            metrics[f"{METRIC_PREFIXES['attn_dist']}{layer}"] = float(dist.mean())
            metrics[f"{METRIC_PREFIXES['nmi']}{layer}"] = float(nmi.mean())
        for layer, value in enumerate(self.fourier):
            metrics[f"{METRIC_PREFIXES['fourier']}{layer}"] = float(value)
        return metrics

    def to_json(self) -> dict[str, list]:
        return {"attn_dist": self.attn_dist.tolist(), "nmi": self.nmi.tolist(), "fourier": self.fourier.tolist()}


@torch.no_grad()
def diagnose(encoder: MaskedViT, images: torch.Tensor, batch_size: int = 16) -> Diagnostics:
    """Run ``encoder`` (eval mode, no masking) on images (B, C, H, W) in chunks; all layers' diagnostics.

    Every measure is a mean over images (Fourier: of log amplitudes), so chunk means weighted by chunk size
    give the same result as one pass over all images, with bounded memory for the attention maps.
    """
    was_training = encoder.training
    encoder.eval()
    grid, depth = encoder.grid_size, encoder.depth
    device = next(encoder.parameters()).device
    attn_dist = np.zeros((depth, encoder.vit.blocks[0].attn.num_heads))
    nmi = np.zeros_like(attn_dist)
    fourier = np.zeros(depth + 1)
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].to(device)
        weight = chunk.shape[0] / images.shape[0]
        out = encoder(chunk, return_layers=tuple(range(depth)), return_attn=True)
        fourier[0] += weight * fourier_high_freq(encoder.embed(chunk), grid)
        for block in range(depth):
            attn_dist[block] += weight * mean_attention_distance(out.attn[block], grid, encoder.patch_size).numpy(
                force=True
            )
            nmi[block] += weight * attention_nmi(out.attn[block], grid).numpy(force=True)
            fourier[block + 1] += weight * fourier_high_freq(out.layers[block], grid)
    encoder.train(was_training)
    return Diagnostics(attn_dist=attn_dist, nmi=nmi, fourier=fourier)


def diagnostic_figure(diagnostics: Diagnostics, title: str = "") -> Figure:
    """Three panels over layers: attention distance and NMI (one dot per head, line = head mean), Fourier.

    A pyplot-free :class:`~matplotlib.figure.Figure` (renders with Agg, nothing to close).
    """
    figure = Figure(figsize=(13, 3.6))
    axes = figure.subplots(1, 3)
    depth = diagnostics.attn_dist.shape[0]
    layers = np.arange(1, depth + 1)
    for axis, values, label in (
        (axes[0], diagnostics.attn_dist, "mean attention distance (px)"),
        (axes[1], diagnostics.nmi, "NMI(query; key)"),
    ):
        heads = values.shape[1]
        axis.scatter(np.repeat(layers, heads), values.flatten(), s=12, alpha=0.5, label="heads")
        axis.plot(layers, values.mean(axis=1), color="black", marker="o", label="head mean")
        axis.set_xlabel("layer (block)")
        axis.set_title(label)
        axis.legend(fontsize=8)
    axes[2].plot(np.arange(depth + 1), diagnostics.fourier, marker="o")
    axes[2].set_xlabel("layer (0 = patch embedding)")
    axes[2].set_title("delta log amplitude (highest frequency)")
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure
