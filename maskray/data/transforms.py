"""Image transforms run inside the loader workers (module-level classes, so they pickle for forkserver)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from maskray.data.sample import DecodedSample, image_array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[tuple[float, ...], ...]:
    """(mean, std) for ``in_chans`` channels: one value per channel, except that 3-channel statistics (e.g. the
    ImageNet defaults) are averaged for greyscale (``in_chans=1``). ValueError naming ``data.mean`` /
    ``data.std`` otherwise."""
    if in_chans == 1 and len(mean) == len(std) == 3:
        return (sum(mean) / 3,), (sum(std) / 3,)
    for name, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != in_chans:
            raise ValueError(f"{name} has {len(values)} values, model.in_chans is {in_chans} (give one per channel"
                             + (", or 3 to average" if in_chans == 1 else "") + ")")
    return tuple(mean), tuple(std)


@dataclass(frozen=True)
class Photometric:
    """Random photometric augmentation of a (C, H, W) float image in [0, 1], before normalisation (the
    BYOL / MoCo v3 / MSN recipe): with probability ``jitter`` a ColorJitter(brightness, contrast, saturation,
    hue = ``jitter_strength``) in random order, with probability ``grayscale`` conversion to grey (kept at C
    channels), with probability ``blur`` a Gaussian blur with sigma uniform in ``blur_sigma`` (kernel 2*ceil(3
    sigma_max)+1, capped at the image's odd size), with probability ``solarize`` solarisation at 0.5. On one
    channel, saturation, hue and greyscale do nothing. Randomness comes from torch's generator (the reader seeds
    it per loader worker and rank). All probabilities 0 is the identity.
    """

    jitter: float = 0.8
    jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale: float = 0.2
    blur: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0

    def __post_init__(self):
        for name in ("jitter", "grayscale", "blur", "solarize"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Photometric.{name} is a probability in [0, 1], got {getattr(self, name)}")
        low, high = self.blur_sigma
        if not 0 < low <= high:
            raise ValueError(f"Photometric.blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        if len(self.jitter_strength) != 4 or min(self.jitter_strength) < 0 or self.jitter_strength[3] > 0.5:
            raise ValueError("Photometric.jitter_strength is (brightness, contrast, saturation, hue), each >= 0, "
                             f"hue <= 0.5; got {self.jitter_strength}")
        object.__setattr__(self, "jitter_strength", tuple(self.jitter_strength))
        object.__setattr__(self, "blur_sigma", tuple(self.blur_sigma))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (C, H, W) in [0, 1] -> (C, H, W) in [0, 1]."""
        if _happens(self.jitter):
            pixels = T.ColorJitter(*self.jitter_strength)(pixels)
        if pixels.shape[0] == 3 and _happens(self.grayscale):
            pixels = F.rgb_to_grayscale(pixels, num_output_channels=3)
        if _happens(self.blur):
            low, high = self.blur_sigma
            sigma = low + (high - low) * float(torch.rand(()))
            size = min(pixels.shape[-2:])
            kernel = min(2 * int(np.ceil(3 * high)) + 1, size if size % 2 else size - 1)
            pixels = F.gaussian_blur(pixels, [kernel, kernel], [sigma, sigma])
        if _happens(self.solarize):
            pixels = F.solarize(pixels, 0.5)
        return pixels.clamp(0.0, 1.0)


def _happens(probability: float) -> bool:
    return probability > 0 and (probability >= 1 or bool(torch.rand(()) < probability))


class Normalize:
    """``(pixels - mean) / std`` per channel of a (..., C, H, W) float32 tensor, into a new tensor: the arithmetic of
    torchvision's ``Normalize`` (float32 statistics, subtract then divide: the same bits) with the statistics made
    tensors once, not on every call. ValueError for a zero std (torchvision's, raised here at construction)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        if (self.std == 0).any():
            raise ValueError(f"std {tuple(std)} evaluated to zero after conversion to torch.float32, leading to "
                             "division by zero")

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std


class ImageTransform:
    """PIL image, band array or a sample's image 0 / bands -> normalised float tensor (C, img_size, img_size),
    C = ``in_chans``.

    Train: RandomResizedCrop(img_size, scale=crop_scale, bicubic) and, if ``hflip``, a random horizontal
    flip (the MAE recipe). Eval: resize the shorter side to img_size (bicubic) and center-crop, which
    is a plain resize for square images. ``in_chans`` 1 or 3 convert an 8-bit image to grey or RGB (PIL, any
    mode); any other input (other channel counts, 16-bit images, ``bands.npy`` arrays) keeps its own channels
    (:func:`~maskray.data.sample.image_array`, scaled to [0, 1] by its bit depth; one channel is repeated for
    ``in_chans=3``), must have exactly ``in_chans`` of them (else ValueError: the reader skips and counts the
    sample) and gets the same geometry on every channel. ``photometric`` (train only): a :class:`Photometric`
    augmentation applied in [0, 1] before normalisation. ``mean``/``std``: see :func:`channel_stats`.
    Transforms with equal arguments are equal.
    """

    def __init__(
        self,
        img_size: int,
        train: bool,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_chans: int = 3,
        photometric: Photometric | None = None,
    ):
        if photometric is not None and not train:
            raise ValueError("photometric augmentation is for training transforms only")
        self.args = (img_size, train, tuple(crop_scale), hflip, tuple(mean), tuple(std), in_chans, photometric)
        self.photometric = photometric
        mean, std = channel_stats(mean, std, in_chans)
        self.img_size, self.in_chans = img_size, in_chans
        self.mode = {1: "L", 3: "RGB"}.get(in_chans)
        bicubic = T.InterpolationMode.BICUBIC
        if train:
            geometry = [T.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=bicubic)]
            if hflip:
                geometry.append(T.RandomHorizontalFlip())
        else:
            geometry = [T.Resize(img_size, interpolation=bicubic), T.CenterCrop(img_size)]
        self.geometry = T.Compose(geometry)  # PIL images and (C, H, W) tensors alike
        self.normalize = Normalize(mean, std)

    @classmethod
    def for_training(cls, model, data) -> ImageTransform:
        """The training augmentation of a run: ``model`` / ``data`` are its ModelConfig / DataConfig."""
        return cls(model.img_size, train=True, crop_scale=data.crop_scale, hflip=data.hflip,
                   mean=data.mean, std=data.std, in_chans=model.in_chans)

    @classmethod
    def for_eval(cls, model, data) -> ImageTransform:
        """The evaluation transform of a run (resize + center crop, the run's normalisation)."""
        return cls(model.img_size, train=False, mean=data.mean, std=data.std, in_chans=model.in_chans)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The output shape (C, img_size, img_size)."""
        return self.in_chans, self.img_size, self.img_size

    def __call__(self, image: Image.Image | np.ndarray | DecodedSample) -> torch.Tensor:
        return self.normalize(self.pixels(image))

    def pixels(self, image: Image.Image | np.ndarray | DecodedSample) -> torch.Tensor:
        """The crop before normalisation: (C, img_size, img_size) in [0, 1], photometric augmentation applied."""
        if isinstance(image, DecodedSample):
            image = image.image_or_bands()
        if self.mode and isinstance(image, Image.Image) and not image.mode.startswith(("I", "F")):
            image = image if image.mode == self.mode else image.convert(self.mode)  # same mode: convert only copies
            return self._augment(F.to_tensor(self.geometry(image)))
        pixels = image_array(image)
        scale = 255.0 if pixels.dtype == np.uint8 else 65535.0
        tensor = torch.from_numpy(pixels.astype(np.float32) / scale).permute(2, 0, 1)  # (C, H, W) in [0, 1]
        if tensor.shape[0] == 1 and self.in_chans == 3:
            tensor = tensor.expand(3, -1, -1)
        if tensor.shape[0] != self.in_chans:
            raise ValueError(f"image has {tensor.shape[0]} channels, model.in_chans is {self.in_chans}")
        return self._augment(self.geometry(tensor))

    def _augment(self, pixels: torch.Tensor) -> torch.Tensor:
        """(C, S, S) in [0, 1] -> photometric augmentation (if any)."""
        return self.photometric(pixels) if self.photometric else pixels

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageTransform) and other.args == self.args

    def __hash__(self) -> int:
        return hash(self.args)

    def __repr__(self) -> str:
        names = ("img_size", "train", "crop_scale", "hflip", "mean", "std", "in_chans", "photometric")
        return f"ImageTransform({', '.join(f'{n}={v!r}' for n, v in zip(names, self.args, strict=True))})"
