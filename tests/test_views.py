"""Decoded samples, sample transforms (Views and their entries) and the reader's nested collate."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from helpers import npy_bytes, png_bytes
from PIL import Image
from torchvision import transforms as T

from maskray.data import (
    BlockMask,
    DecodedSample,
    FramePair,
    ImageTransform,
    MultiCrop,
    Photometric,
    RandomMask,
    Sample,
    Views,
    batch_size,
    build_loader,
    collate,
    write_shards,
)

UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # FramePair outputs pixel / 255


def _sample(members: dict[str, bytes]) -> DecodedSample:
    return DecodedSample(key="k", label=-1, url="shard-000000.tar", members=members)


def _random(shape: tuple[int, ...], seed: int = 0, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, shape, dtype=np.uint8)


# --- DecodedSample ------------------------------------------------------------------------------------


def test_decoded_sample_images_in_member_name_order():
    pixels = [_random((5, 7, 3), seed) for seed in range(3)]
    sample = _sample({f"{i:03d}.png": png_bytes(pixels[i]) for i in (2, 0, 1)})
    assert sample.num_images == sample.num_frames == 3
    assert all((np.asarray(sample.image(i)) == pixels[i]).all() for i in range(3))
    assert (sample.frames() == np.stack(pixels)).all() and sample.frames().dtype == np.uint8
    grey = _sample({"png": png_bytes(pixels[0][..., 0])})
    assert grey.num_images == 1 and grey.frames().shape == (1, 5, 7, 1)
    mixed = _sample({"000.png": png_bytes(pixels[0][..., 0]), "001.png": png_bytes(pixels[1])})
    assert mixed.frames().shape == (2, 5, 7, 3) and (mixed.frames()[0] == pixels[0][..., :1]).all()
    with pytest.raises(IndexError):
        sample.image(3)


def test_decoded_sample_npy_clip_and_errors():
    clip = _random((4, 6, 5))
    sample = _sample({"npy": npy_bytes(clip)})
    assert sample.num_frames == 4 and sample.num_images == 0
    assert (sample.frames() == clip[..., None]).all()
    assert _sample({"npy": npy_bytes(_random((2, 3, 3, 3)))}).frames().shape == (2, 3, 3, 3)
    with pytest.raises(ValueError, match="no image member"):
        sample.image()
    for bad in (np.zeros((2, 3, 3), np.float32), np.zeros((3, 3), np.uint8), np.array([{"a": 1}], dtype=object)):
        with pytest.raises(ValueError, match="expected uint8"):
            _sample({"npy": npy_bytes(bad, allow_pickle=True)}).frames()
    with pytest.raises(ValueError, match="no frames"):
        _sample({"json": b"{}"}).frames()
    with pytest.raises(OSError):
        _sample({"png": b"not an image"}).image()


# --- ImageTransform, MultiCrop, BlockMask, Views ------------------------------------------------------


def test_image_transform_takes_samples_and_has_value_equality():
    pixels = _random((10, 12, 3))
    sample = _sample({"png": png_bytes(pixels)})
    transform = ImageTransform(8, train=False)
    assert torch.equal(transform(sample), transform(Image.fromarray(pixels)))
    assert transform.shape == (3, 8, 8) and ImageTransform(6, train=True, in_chans=1).shape == (1, 6, 6)
    assert transform == ImageTransform(8, train=False) and hash(transform) == hash(ImageTransform(8, False))
    assert transform != ImageTransform(8, train=True) and transform != ImageTransform(8, False, std=(1, 1, 1))
    assert ImageTransform(8, True, crop_scale=[0.5, 1.0]) == ImageTransform(8, True, crop_scale=(0.5, 1.0))
    assert pickle.loads(pickle.dumps(transform)) == transform


def test_image_transform_equals_torchvision_composition_bit_for_bit():
    """The transform (a same-mode image not copied, normalisation with precomputed statistics) gives the bits of
    torchvision's convert -> RandomResizedCrop / flip (or Resize / CenterCrop) -> ToTensor -> Normalize."""
    bicubic = T.InterpolationMode.BICUBIC
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for mode, train in [("RGB", True), ("L", True), ("RGBA", True), ("RGB", False), ("P", False)]:
        image = Image.fromarray(_random((20, 14, 3), seed=len(mode))).convert(mode)
        geometry = ([T.RandomResizedCrop(8, scale=(0.3, 1.0), interpolation=bicubic), T.RandomHorizontalFlip()]
                    if train else [T.Resize(8, interpolation=bicubic), T.CenterCrop(8)])
        reference = T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])
        ours = ImageTransform(8, train=train, crop_scale=(0.3, 1.0), mean=mean, std=std)
        for seed in range(4):
            torch.manual_seed(seed)
            expected = reference(image.convert("RGB"))
            torch.manual_seed(seed)
            assert torch.equal(ours(image), expected), (mode, train, seed)
    with pytest.raises(ValueError, match="division by zero"):
        ImageTransform(8, train=False, std=(0.5, 0.0, 0.5))


def test_photometric_augmentation():
    pixels = torch.rand(3, 8, 8)
    identity = Photometric(jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)
    assert torch.equal(identity(pixels), pixels)
    grey = Photometric(jitter=0.0, grayscale=1.0, blur=0.0)(pixels)
    assert grey.shape == (3, 8, 8) and torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])
    solarized = Photometric(jitter=0.0, grayscale=0.0, blur=0.0, solarize=1.0)(pixels)
    assert torch.allclose(solarized, torch.where(pixels >= 0.5, 1 - pixels, pixels))
    blurred = Photometric(jitter=0.0, grayscale=0.0, blur=1.0, blur_sigma=(1.0, 1.0))(pixels)
    assert blurred.var() < pixels.var()  # a low-pass filter of noise
    torch.manual_seed(0)
    first = Photometric()(pixels)
    torch.manual_seed(0)
    assert torch.equal(Photometric()(pixels), first) and 0 <= first.min() and first.max() <= 1
    one_channel = Photometric(blur=0.0)(pixels[:1])  # greyscale inputs: brightness/contrast only
    assert one_channel.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="grayscale"):
        Photometric(grayscale=1.5)
    with pytest.raises(ValueError, match="training"):
        ImageTransform(8, train=False, photometric=Photometric())
    transform = ImageTransform(8, train=True, photometric=Photometric(solarize=0.2))
    assert transform == ImageTransform(8, train=True, photometric=Photometric(solarize=0.2))
    assert transform != ImageTransform(8, train=True) and pickle.loads(pickle.dumps(transform)) == transform
    image = transform(Image.fromarray(_random((10, 12, 3))))
    assert image.shape == (3, 8, 8)


def test_views_shapes_merge_and_equality():
    crops = MultiCrop([ImageTransform(8, train=True), ImageTransform(4, train=True)])
    views = Views(image=ImageTransform(8, train=True), crops=crops, mask=BlockMask((4, 4), 6, min_block=2))
    assert views.shapes() == {"image": (3, 8, 8), "crops": [(3, 8, 8), (3, 4, 4)], "mask": (16,)}
    out = views(_sample({"jpg": png_bytes(_random((9, 9, 3)))}))
    assert out["image"].shape == (3, 8, 8) and [c.shape for c in out["crops"]] == [(3, 8, 8), (3, 4, 4)]
    assert out["mask"].dtype == torch.int64 and out["mask"].sum() == 6

    twin = Views(mask=BlockMask((4, 4), 6, min_block=2), pair=FramePair(8, max_gap=3))
    merged = views.merge(twin)
    assert list(merged.entries) == ["image", "crops", "mask", "pair"] and merged.merge(views) == merged
    assert merged.shapes()["pair"] == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="'mask'"):
        views.merge(Views(mask=BlockMask((4, 4), 7, min_block=2)))
    with pytest.raises(ValueError, match="'image'"):
        views.merge(Views(image=ImageTransform(8, train=False)))
    with pytest.raises(ValueError, match="taken"):
        Views(label=ImageTransform(8, train=False))
    with pytest.raises(TypeError, match="'plain'"):
        Views(plain=lambda sample: torch.zeros(1)).shapes()

    assert pickle.loads(pickle.dumps(merged)) == merged and hash(pickle.loads(pickle.dumps(merged))) == hash(merged)
    assert MultiCrop([ImageTransform(8, True)]) == MultiCrop((ImageTransform(8, True),))
    assert FramePair(8, 2) != FramePair(8, 3) and BlockMask([4, 4], 6) == BlockMask((4, 4), 6)


def test_block_mask_generator_follows_the_torch_seed():
    def draws(entry, count=4):
        return [tuple(entry(None).tolist()) for _ in range(count)]

    torch.manual_seed(1)
    entry = BlockMask((6, 6), 12, min_block=4)
    first = draws(entry)
    assert len(set(first)) > 1 and all(len(mask) == 36 and sum(mask) == 12 for mask in first)
    assert draws(BlockMask((6, 6), 12, min_block=4)) == first  # a fresh copy under the same torch seed
    assert draws(entry) != first  # the same generator goes on
    torch.manual_seed(2)  # as in a new loader worker: a new torch seed, a new generator
    second = draws(entry)
    assert second == draws(BlockMask((6, 6), 12, min_block=4)) and second != first


def test_random_mask_masks_whole_squares_in_the_simmim_count():
    torch.manual_seed(0)
    entry = RandomMask((4, 6), ratio=0.6, block=2)  # 2x3 squares of 2x2 patches: ceil(6 * 0.6) = 4 masked
    masks = [entry(None).reshape(4, 6) for _ in range(20)]
    for mask in masks:
        squares = mask.reshape(2, 2, 3, 2).permute(0, 2, 1, 3).reshape(6, 4)  # (square, patch in square)
        assert mask.dtype == torch.int64 and int(mask.sum()) == 4 * 4
        assert all(len(set(square.tolist())) == 1 for square in squares)  # a square is masked whole or not at all
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 5
    assert RandomMask((4, 4), 0.5) == RandomMask([4, 4], 0.5) and entry.shape == (24,)
    with pytest.raises(ValueError, match="does not tile"):
        RandomMask((4, 6), 0.5, block=4)


def test_views_in_forkserver_loader_workers(tmp_path):
    """Every view has its declared shape inside loader worker processes; masks are exact, and differ between
    samples, loader workers and ranks (ranks that seeded torch alike included)."""
    samples = [Sample(f"s{i:02d}", image=png_bytes(_random((10, 10, 3), i)), ext="png") for i in range(16)]
    shards = write_shards(samples, tmp_path, samples_per_shard=4, progress=False)
    views = Views(
        big=ImageTransform(12, train=True),
        small=ImageTransform(6, train=False),
        crops=MultiCrop([ImageTransform(8, train=True), ImageTransform(4, train=True), ImageTransform(4, train=True)]),
        mask=BlockMask((6, 6), 12, min_block=4),
    )
    shapes = views.shapes()
    masks = {}
    for rank in range(2):
        torch.manual_seed(0)  # every rank seeds torch alike, as the training worker does
        loader = build_loader(shards, views, batch_size=4, rank=rank, world_size=2, num_workers=2,
                              multiprocessing_context="forkserver")
        for batch in loader:
            assert batch_size(batch) == 4 and set(batch) == {*shapes, "key", "label", "skipped", "bad"}
            for name in ("big", "small", "mask"):
                assert batch[name].shape == (4, *shapes[name])
            assert [crop.shape for crop in batch["crops"]] == [(4, *shape) for shape in shapes["crops"]]
            assert batch["mask"].dtype == torch.int64 and (batch["mask"].sum(dim=1) == 12).all()
            masks.update(zip(batch["key"], map(tuple, batch["mask"].tolist()), strict=True))
    assert len(masks) == 16
    # shard i -> global worker i (rank i // 2, worker i % 2): the k-th sample of each shard is drawn by the
    # k-th draw of its own generator, so equal masks here would mean shared generators
    for k in range(4):
        assert len({masks[f"s{4 * shard + k:02d}"] for shard in range(4)}) == 4
    assert len(set(masks.values())) > 12


# --- FramePair ----------------------------------------------------------------------------------------


def test_frame_pair_gap_and_start():
    levels = 20 + 10 * np.arange(8)
    clip = np.broadcast_to(levels[:, None, None, None], (8, 12, 12, 3)).astype(np.uint8)  # frame t = 20 + 10t
    sample = _sample({"npy": npy_bytes(clip)})
    entry = FramePair(6, max_gap=3, **UNIT)
    torch.manual_seed(0)
    pairs = set()
    for _ in range(300):
        out = entry(sample)
        assert out.shape == entry.shape == (2, 3, 6, 6)
        i, j = (int(round((float(out[v].mean()) * 255 - 20) / 10)) for v in (0, 1))
        assert 0 < j - i <= 3 and 0 <= i and j < 8
        pairs.add((i, j))
    assert {j - i for i, j in pairs} == {1, 2, 3} and {i for i, _ in pairs} == set(range(7))
    single = _sample({"npy": npy_bytes(clip[:1])})
    assert all(torch.equal(*FramePair(6, max_gap=3)(single)) for _ in range(5))


def test_frame_pair_crops_both_frames_alike():
    torch.manual_seed(0)
    still = np.broadcast_to(_random((16, 20, 3)), (5, 16, 20, 3))
    for members in ({"npy": npy_bytes(still)}, {f"{t:03d}.png": png_bytes(frame) for t, frame in enumerate(still)}):
        out = FramePair(8, max_gap=4, crop_scale=(0.2, 1.0))(_sample(members))
        assert torch.equal(out[0], out[1])
    base = _random((16, 20, 3), low=70, high=150)
    shifted = np.stack([base + 25 * t for t in range(3)]).astype(np.uint8)  # frame t = base + 25t
    grey = FramePair(8, max_gap=2, crop_scale=(0.2, 1.0), in_chans=1, mean=(0.0,), std=(1.0,))
    for entry in (FramePair(8, max_gap=2, crop_scale=(0.2, 1.0), **UNIT), grey):
        differences = set()
        for _ in range(20):
            out = entry(_sample({"npy": npy_bytes(shifted)}))
            assert out.shape == entry.shape
            difference = (out[1] - out[0]) * 255  # the same crop of both: 25 * gap everywhere (+-1 rounding)
            assert float(difference.max() - difference.min()) <= 2.01
            differences.add(int(round(float(difference.mean()))))
        assert differences <= {25, 50}
    two = np.stack([base, _random((16, 20, 3), seed=1)])
    other = FramePair(8, max_gap=1, **UNIT)(_sample({"npy": npy_bytes(two)}))
    assert not torch.equal(other[0], other[1])


# --- collate ------------------------------------------------------------------------------------------


def test_nested_collate():
    items = [
        {"x": torch.full((2, 3), float(i)), "views": [torch.zeros(3), torch.ones(1, 2)],
         "meta": {"t": i, "w": 0.5 * i, "name": f"n{i}", "pair": (torch.tensor(i), i)}}
        for i in range(4)
    ]
    batch = collate(items)
    assert batch["x"].shape == (4, 2, 3) and batch["x"][:, 0, 0].tolist() == [0, 1, 2, 3]
    assert [view.shape for view in batch["views"]] == [(4, 3), (4, 1, 2)]
    meta = batch["meta"]
    assert meta["t"].dtype == torch.int64 and meta["t"].tolist() == [0, 1, 2, 3]
    assert meta["w"].dtype == torch.float32 and meta["name"] == ["n0", "n1", "n2", "n3"]
    assert [part.tolist() for part in meta["pair"]] == [[0, 1, 2, 3]] * 2
    with pytest.raises(ValueError, match="different keys"):
        collate([{"a": 1}, {"b": 1}])
    with pytest.raises(ValueError):
        collate([[torch.zeros(1)], [torch.zeros(1), torch.zeros(1)]])
    with pytest.raises(TypeError, match="ndarray"):
        collate([np.zeros(2)])


def _nested(sample: DecodedSample) -> dict:
    image = torch.from_numpy(np.array(sample.image())).float()
    return {"stats": {"mean": float(image.mean()), "size": list(image.shape)}, "views": [image, image[:2]]}


def _unnamed(sample: DecodedSample) -> torch.Tensor:
    return torch.zeros(1)


def test_loader_collates_nested_outputs_and_rejects_non_dicts(tmp_path):
    pixels = [_random((5, 4, 3), i) for i in range(6)]
    samples = [Sample(f"s{i}", image=png_bytes(p), ext="png", label=i) for i, p in enumerate(pixels)]
    shards = write_shards(samples, tmp_path, samples_per_shard=6, progress=False)
    batches = list(build_loader(shards, _nested, batch_size=4, num_workers=0, drop_last=False))
    assert [batch_size(batch) for batch in batches] == [4, 2] and batches[1]["label"].tolist() == [4, 5]
    first = batches[0]
    assert torch.allclose(first["stats"]["mean"], torch.tensor([float(p.mean()) for p in pixels[:4]]))
    assert [size.tolist() for size in first["stats"]["size"]] == [[5] * 4, [4] * 4, [3] * 4]
    assert [view.shape for view in first["views"]] == [(4, 5, 4, 3), (4, 2, 4, 3)]
    with pytest.raises(TypeError, match="must return a dict"):
        next(iter(build_loader(shards, _unnamed, batch_size=2, num_workers=0)))
