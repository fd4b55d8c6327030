"""Image transforms run inside the loader workers (module-level classes, so they pickle for forkserver)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from maskray.data.sample import DecodedSample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[tuple[float, ...], ...]:
    """(mean, std) for ``in_chans`` channels: 3-channel statistics are averaged for greyscale (``in_chans=1``)."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if in_chans == 1 and len(mean) == 3:
        return (sum(mean) / 3,), (sum(std) / 3,)
    return tuple(mean), tuple(std)


class ImageTransform:
    """PIL image, or a sample's image 0 -> normalised float tensor (C, img_size, img_size), C = ``in_chans``
    (3: RGB, 1: grey).

    Train: RandomResizedCrop(img_size, scale=crop_scale, bicubic) and, if ``hflip``, a random horizontal
    flip (the MAE recipe). Eval: resize the shorter side to img_size (bicubic) and center-crop, which
    is a plain resize for square images. With ``in_chans=1`` and 3-channel ``mean``/``std`` (the
    ImageNet defaults) the channel averages are used. Transforms with equal arguments are equal.
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
    ):
        self.args = (img_size, train, tuple(crop_scale), hflip, tuple(mean), tuple(std), in_chans)
        mean, std = channel_stats(mean, std, in_chans)
        self.img_size, self.in_chans = img_size, in_chans
        self.mode = "RGB" if in_chans == 3 else "L"
        bicubic = T.InterpolationMode.BICUBIC
        if train:
            geometry = [T.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=bicubic)]
            if hflip:
                geometry.append(T.RandomHorizontalFlip())
        else:
            geometry = [T.Resize(img_size, interpolation=bicubic), T.CenterCrop(img_size)]
        self.transform = T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])

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

    def __call__(self, image: Image.Image | DecodedSample) -> torch.Tensor:
        if isinstance(image, DecodedSample):
            image = image.image()
        return self.transform(image.convert(self.mode))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageTransform) and other.args == self.args

    def __hash__(self) -> int:
        return hash(self.args)

    def __repr__(self) -> str:
        names = ("img_size", "train", "crop_scale", "hflip", "mean", "std", "in_chans")
        return f"ImageTransform({', '.join(f'{n}={v!r}' for n, v in zip(names, self.args, strict=True))})"
