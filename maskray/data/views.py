"""Sample transforms that objectives declare: named views of a :class:`~maskray.data.sample.DecodedSample`.

``Views(image=ImageTransform(224, train=True), mask=BlockMask((14, 14), 75))`` is the transform given to
:func:`maskray.data.build_loader`; each batch then holds ``image`` (B, 3, 224, 224) and ``mask`` (B, 196).
An entry is a callable ``entry(sample) -> Tensor | list[Tensor]`` with a ``shape`` (a list of shapes for a
list). The entries here run in the loader workers: they are module-level classes (they pickle for the
``forkserver`` start method), equal when built from equal arguments, and draw their randomness from the
worker process's generators (torch's, which the reader seeds per loader worker and rank).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from maskray.data.reader import RESERVED
from maskray.data.sample import DecodedSample
from maskray.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, channel_stats
from maskray.masking.block import block_mask

Shape = tuple[int, ...]
Entry = Callable[[DecodedSample], torch.Tensor | list[torch.Tensor]]


class Views:
    """Named views: ``Views(**entries)(sample) == {name: entry(sample)}``.

    Composite objectives combine theirs with :meth:`merge`, so a view two objectives both declare (same
    name, equal entry) is produced once per sample.
    """

    def __init__(self, **entries: Entry):
        if not entries:
            raise ValueError("Views needs at least one entry")
        reserved = sorted(set(entries) & set(RESERVED))
        if reserved:
            raise ValueError(f"view names {reserved} are taken by the batch fields {RESERVED}")
        self.entries = entries

    def __call__(self, sample: DecodedSample) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        return {name: entry(sample) for name, entry in self.entries.items()}

    def shapes(self) -> dict[str, Shape | list[Shape]]:
        """Each view's per-sample output shape, as its entry declares it (``entry.shape``)."""
        missing = [name for name, entry in self.entries.items() if not hasattr(entry, "shape")]
        if missing:
            raise TypeError(f"view(s) {missing} declare no shape")
        return {name: entry.shape for name, entry in self.entries.items()}

    def merge(self, other: Views) -> Views:
        """The union of both views; entries sharing a name must be equal (ValueError naming the view)."""
        for name in self.entries.keys() & other.entries.keys():
            if self.entries[name] != other.entries[name]:
                raise ValueError(f"view '{name}' is declared twice, differently: "
                                 f"{self.entries[name]!r} and {other.entries[name]!r}")
        return Views(**{**self.entries, **other.entries})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Views) and other.entries == self.entries

    def __hash__(self) -> int:
        return hash(frozenset(self.entries.items()))

    def __repr__(self) -> str:
        return f"Views({', '.join(f'{name}={entry!r}' for name, entry in self.entries.items())})"


@dataclass(frozen=True)
class MultiCrop:
    """Several crops of a sample's image 0 (or its bands), one per transform (sizes may differ) -> list of
    (C, S_i, S_i).

    E.g. MSN's target view, random anchor views and small focal views of one image.
    """

    transforms: tuple[ImageTransform, ...]

    def __post_init__(self):
        if not self.transforms:
            raise ValueError("MultiCrop needs at least one transform")
        object.__setattr__(self, "transforms", tuple(self.transforms))

    @property
    def shape(self) -> list[Shape]:
        return [transform.shape for transform in self.transforms]

    def __call__(self, sample: DecodedSample) -> list[torch.Tensor]:
        image = sample.image_or_bands()
        return [transform(image) for transform in self.transforms]


@dataclass(frozen=True)
class SharedCrop:
    """One crop of a sample (geometry and photometric draw made once) in two renderings -> [normalised (C, S, S),
    pixels in [0, 1] (C, S, S)]: the student's input and the input of a teacher that applies its own
    normalisation (BEiT v2's tokenizer, a VQ-KD or DTM feature teacher), as the reference renders one crop twice."""

    transform: ImageTransform

    @property
    def shape(self) -> list[Shape]:
        return [self.transform.shape, self.transform.shape]

    def __call__(self, sample: DecodedSample) -> list[torch.Tensor]:
        pixels = self.transform.pixels(sample)
        return [self.transform.normalize(pixels), pixels]


@dataclass(frozen=True)
class FramePair:
    """Two frames of a clip -> (2, C, img_size, img_size): frames ``i`` and ``i + gap`` of ``sample.frames()``.

    ``gap`` is uniform in 1..min(max_gap, T - 1), then ``i`` uniform in 0..T - 1 - gap (ToBo's sampler; a clip
    of one frame gives that frame twice). Both frames get the same RandomResizedCrop box (scale
    ``crop_scale``, ratio 3/4..4/3, bicubic) and, if ``hflip``, the same random horizontal flip, then are
    normalised like :class:`~maskray.data.transforms.ImageTransform` (C = ``in_chans``: 3 RGB, 1 grey).
    """

    img_size: int
    max_gap: int
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_chans: int = 3

    def __post_init__(self):
        if self.max_gap < 1:
            raise ValueError(f"max_gap must be >= 1, got {self.max_gap}")
        if self.in_chans not in (1, 3):  # clips are stored as grey or RGB
            raise ValueError(f"FramePair needs in_chans 1 or 3, got {self.in_chans}")
        channel_stats(self.mean, self.std, self.in_chans)
        for name in ("crop_scale", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def shape(self) -> Shape:
        return 2, self.in_chans, self.img_size, self.img_size

    def __call__(self, sample: DecodedSample) -> torch.Tensor:
        frames = sample.frames()  # (T, H, W, C) uint8
        gap = int(torch.randint(1, min(self.max_gap, len(frames) - 1) + 1, ())) if len(frames) > 1 else 0
        start = int(torch.randint(0, len(frames) - gap, ()))
        mode = "RGB" if self.in_chans == 3 else "L"
        pair = [Image.fromarray(frames[t].squeeze(-1) if frames.shape[-1] == 1 else frames[t]).convert(mode)
                for t in (start, start + gap)]
        top, left, height, width = T.RandomResizedCrop.get_params(pair[0], list(self.crop_scale), [3 / 4, 4 / 3])
        flip = self.hflip and bool(torch.rand(()) < 0.5)
        mean, std = channel_stats(self.mean, self.std, self.in_chans)
        out = []
        for image in pair:
            image = F.resized_crop(image, top, left, height, width, [self.img_size, self.img_size],
                                   interpolation=T.InterpolationMode.BICUBIC)
            out.append(F.normalize(F.to_tensor(F.hflip(image) if flip else image), mean, std))
        return torch.stack(out)


class _LoaderGenerator:
    """A numpy generator created on the first draw of a process, seeded from ``torch.initial_seed()`` (per loader
    worker and rank, see :mod:`maskray.data.reader`), and re-created if that seed changes (a forked worker).
    Subclasses are frozen dataclasses with a ``_state`` dict field (excluded from equality)."""

    def _generator(self) -> np.random.Generator:
        seed = torch.initial_seed()
        if self._state.get("seed") != seed:
            self._state.update(seed=seed, rng=np.random.default_rng(seed))
        return self._state["rng"]


@dataclass(frozen=True)
class BlockMask(_LoaderGenerator):
    """A BEiT block-wise mask -> (L,) int64, L = H * W of ``grid``, exactly ``num_masked`` ones (1 = masked).

    See :func:`maskray.masking.block.block_mask` for the arguments.
    """

    grid: tuple[int, int]
    num_masked: int
    min_block: int = 16
    max_block: int | None = None
    min_aspect: float = 0.3
    _state: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(self.grid))
        if not 0 <= self.num_masked <= self.grid[0] * self.grid[1]:
            raise ValueError(f"num_masked={self.num_masked} does not fit a {self.grid[0]}x{self.grid[1]} grid")

    @property
    def shape(self) -> Shape:
        return (self.grid[0] * self.grid[1],)

    def __call__(self, sample: DecodedSample) -> torch.Tensor:
        mask = block_mask(self.grid, self.num_masked, self._generator(), self.min_block, self.max_block,
                          self.min_aspect)
        return torch.from_numpy(mask.reshape(-1))


@dataclass(frozen=True)
class RandomMask(_LoaderGenerator):
    """SimMIM's random mask -> (L,) int64 over a patch ``grid`` (1 = masked): the grid is tiled into squares of
    ``block`` x ``block`` patches (SimMIM: 32-pixel mask patches over 16-pixel patches, ``block=2``) and
    ``ceil(ratio * squares)`` squares are masked, as in the SimMIM reference's ``MaskGenerator``."""

    grid: tuple[int, int]
    ratio: float
    block: int = 1
    _state: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(self.grid))
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.block < 1 or self.grid[0] % self.block or self.grid[1] % self.block:
            raise ValueError(f"block {self.block} does not tile the {self.grid[0]}x{self.grid[1]} patch grid")

    @property
    def shape(self) -> Shape:
        return (self.grid[0] * self.grid[1],)

    def __call__(self, sample: DecodedSample) -> torch.Tensor:
        rows, cols = self.grid[0] // self.block, self.grid[1] // self.block
        count = int(np.ceil(rows * cols * self.ratio))
        squares = np.zeros(rows * cols, dtype=np.int64)
        squares[self._generator().permutation(rows * cols)[:count]] = 1
        mask = squares.reshape(rows, cols).repeat(self.block, axis=0).repeat(self.block, axis=1)
        return torch.from_numpy(mask.reshape(-1))

