"""What a loader worker hands to a transform: one sample's raw tar members, decoded on demand."""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from maskray.data.manifest import ARRAY_MEMBER, BANDS_MEMBER, IMAGE_EXTS


@dataclass(frozen=True, eq=False)
class DecodedSample:
    """One sample of a shard: ``key``, ``label`` (-1 when unlabelled), the tar ``url`` and ``members``.

    ``members`` maps member names to raw bytes, without ``__key__`` / ``__url__`` / ``cls``: a single image
    (``{"png": ...}``), a band image (``{"bands.npy": ...}``), several images or frames (``{"000.png": ...,
    "001.png": ...}``) or one array (``{"npy": ...}``). Nothing is decoded until a method asks; decoding errors
    raise (the reader then skips the sample and counts it).
    """

    key: str
    label: int
    url: str
    members: dict[str, bytes]

    @cached_property
    def image_names(self) -> tuple[str, ...]:
        """The image members' names in sorted order (``png``, or ``000.png``, ``001.png``, ...)."""
        return tuple(sorted(name for name in self.members if name.rsplit(".", 1)[-1] in IMAGE_EXTS))

    @property
    def num_images(self) -> int:
        return len(self.image_names)

    def image(self, index: int = 0) -> Image.Image:
        """The ``index``-th image member (sorted member-name order), decoded."""
        if not self.image_names:
            raise ValueError(f"no image member ({'/'.join(IMAGE_EXTS)}) among {sorted(self.members)}")
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} requested, the sample has {self.num_images}")
        image = Image.open(io.BytesIO(self.members[self.image_names[index]]))
        image.load()
        return image

    def image_or_bands(self) -> Image.Image | np.ndarray:
        """A band image's uint8/uint16 (H, W, C) array (``bands.npy``), else image 0 (decoded, its mode kept)."""
        if BANDS_MEMBER in self.members:
            bands_shape(self.members[BANDS_MEMBER])
            return np.load(io.BytesIO(self.members[BANDS_MEMBER]), allow_pickle=False)
        return self.image()

    @property
    def num_frames(self) -> int:
        """T of :meth:`frames`, read from the array header (``npy``) or counted (image members)."""
        if ARRAY_MEMBER in self.members:
            return clip_shape(self.members[ARRAY_MEMBER])[0]
        if not self.image_names:
            raise ValueError(f"no frames (an {ARRAY_MEMBER} member or image members) among {sorted(self.members)}")
        return self.num_images

    def frames(self) -> np.ndarray:
        """The clip as uint8 (T, H, W, C): the ``npy`` array, else the image members stacked in name order.

        Images give C = 1 when all are greyscale (mode ``L``), else C = 3 (RGB); they must share a size.
        """
        if ARRAY_MEMBER in self.members:
            clip_shape(self.members[ARRAY_MEMBER])
            array = np.load(io.BytesIO(self.members[ARRAY_MEMBER]), allow_pickle=False)
            return array[..., None] if array.ndim == 3 else array
        if not self.image_names:
            raise ValueError(f"no frames (an {ARRAY_MEMBER} member or image members) among {sorted(self.members)}")
        images = [self.image(index) for index in range(self.num_images)]
        if all(image.mode == "L" for image in images):
            return np.stack([np.asarray(image) for image in images])[..., None]
        return np.stack([np.asarray(image.convert("RGB")) for image in images])


def image_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 or uint16 pixels of an image in its own mode (L: C = 1, LA: 2, RGB: 3, RGBA and CMYK: 4,
    16-bit grey: uint16, C = 1; palette images as RGB, or RGBA when they have transparency; 1-bit as L) or of a
    band array. ValueError for 32-bit and float images."""
    if isinstance(image, Image.Image):
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
        elif image.mode == "1":
            image = image.convert("L")
        elif image.mode.startswith("I;16"):
            image = np.asarray(image).astype(np.uint16)
        image = np.asarray(image)
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"pixels of type {image.dtype}: only 8- and 16-bit images are supported")
    return image[..., None] if image.ndim == 2 else image


def bands_shape(data: bytes) -> tuple[int, ...]:
    """The shape in ``bands.npy`` bytes (header only), checked to be a uint8/uint16 (H, W, C) band image."""
    shape, dtype = _npy_header(data, BANDS_MEMBER)
    if dtype not in (np.uint8, np.uint16) or len(shape) != 3 or 0 in shape:
        raise ValueError(f"{BANDS_MEMBER} member holds a {dtype} array of shape {shape}, "
                         "expected uint8 or uint16 (H, W, C), no dimension 0")
    return shape


def _npy_header(data: bytes, member: str) -> tuple[tuple[int, ...], np.dtype]:
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"{member} member has .npy format version {version}, expected 1.0 or 2.0")
    return shape, dtype


def clip_shape(data: bytes) -> tuple[int, ...]:
    """The shape stored in ``.npy`` bytes (header only), checked to be a uint8 clip (T, H, W) or (T, H, W, C)."""
    shape, dtype = _npy_header(data, ARRAY_MEMBER)
    if dtype != np.uint8 or len(shape) not in (3, 4) or 0 in shape:
        raise ValueError(f"{ARRAY_MEMBER} member holds a {dtype} array of shape {shape}, "
                         "expected uint8 (T, H, W) or (T, H, W, C), no dimension 0")
    return shape
