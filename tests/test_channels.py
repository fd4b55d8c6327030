"""Any channel count: make_shards keeps modes (RGBA, grey, 16-bit, multi-page TIFF bands), transforms produce
``in_chans`` channels, the driver checks ``data.mean``/``data.std``, and (slow) 1- and 4-channel shard sets train on
Ray and export to timm with the same ``in_chans``."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import check_export, launch, own_lines
from PIL import Image

from maskray.config import load_config
from maskray.data import DecodedSample, ImageTransform, build_loader, resolve_shards
from maskray.data.cli import make_shards
from maskray.data.sample import image_array
from maskray.data.transforms import channel_stats
from maskray.data.writer import Sample, write_shards
from maskray.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _tiff_bands(bands: list[np.ndarray]) -> tuple[Image.Image, list[Image.Image]]:
    """A multi-page TIFF (one page per band) as PIL images to save: the first page, the others appended."""
    pages = [Image.fromarray(band) for band in bands]
    return pages[0], pages[1:]


def _write_folder(root: Path, rng: np.random.Generator) -> None:
    (root / "a").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (12, 10, 4), dtype=np.uint8), "RGBA").save(root / "a" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8), "L").save(root / "a" / "grey.png")
    Image.fromarray(rng.integers(0, 60000, (12, 10), dtype=np.uint16)).save(root / "a" / "deep.tif")
    first, rest = _tiff_bands([np.full((12, 10), 10 * band, np.uint8) for band in range(5)])
    first.save(root / "a" / "bands.tif", save_all=True, append_images=rest)


def _stored(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of each stored sample's pixels (image_array of its image or bands)."""
    def describe(sample: DecodedSample) -> dict:
        pixels = image_array(sample.image_or_bands())
        return {"shape": torch.tensor(pixels.shape), "deep": torch.tensor(pixels.dtype == np.uint16)}

    loader = build_loader(resolve_shards(str(directory)), describe, batch_size=1, num_workers=0, drop_last=False)
    return {batch["key"][0]: (tuple(batch["shape"][0].tolist()), "uint16" if batch["deep"][0] else "uint8")
            for batch in loader}


def test_make_shards_keeps_each_images_mode_unless_told(tmp_path) -> None:
    _write_folder(tmp_path / "src", np.random.default_rng(0))
    make_shards([str(tmp_path / "src"), str(tmp_path / "keep")])
    assert _stored(tmp_path / "keep") == {
        "a_rgba": ((12, 10, 4), "uint8"), "a_grey": ((12, 10, 1), "uint8"),
        "a_deep": ((12, 10, 1), "uint16"), "a_bands": ((12, 10, 5), "uint8"),
    }
    make_shards([str(tmp_path / "src"), str(tmp_path / "rgb"), "--mode", "rgb"])
    assert set(_stored(tmp_path / "rgb").values()) == {((12, 10, 3), "uint8")}
    make_shards([str(tmp_path / "src"), str(tmp_path / "grey"), "--mode", "l"])
    assert set(_stored(tmp_path / "grey").values()) == {((12, 10, 1), "uint8")}


def test_band_images_keep_their_pages_in_order_and_bad_ones_are_refused(tmp_path, capsys) -> None:
    bands = [np.full((6, 8), value, np.uint16) for value in (0, 1000, 65535)]
    first, rest = _tiff_bands(bands)
    first.save(tmp_path / "deep.tiff", save_all=True, append_images=rest)
    make_shards([str(tmp_path), str(tmp_path / "out")])
    [batch] = build_loader(resolve_shards(str(tmp_path / "out")), lambda s: {"bands": torch.from_numpy(
        s.image_or_bands().astype(np.int64))}, batch_size=1, num_workers=0, drop_last=False)
    assert batch["bands"][0, 0, 0].tolist() == [0, 1000, 65535]

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    first, rest = _tiff_bands([np.zeros((6, 8), np.uint8), np.zeros((6, 8, 3), np.uint8)])
    first.save(mixed / "x.tif", save_all=True, append_images=rest)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(mixed / "good.tif")
    float_image = tmp_path / "float"
    float_image.mkdir()
    Image.fromarray(np.zeros((4, 4), np.float32)).save(float_image / "f.tif")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(float_image / "good.tif")
    capsys.readouterr()
    # a bad file is skipped and listed (the conversion goes on); --strict makes that an error after writing
    reasons = {mixed: r"page 1 of .*x\.tif' has mode RGB", float_image: r"f\.tif' has mode F.*--mode rgb"}
    for folder, reason in reasons.items():
        with pytest.raises(DataError, match=r"--strict: 1 item"):
            make_shards([str(folder), str(tmp_path / f"bad-{folder.name}"), "--strict"])
        assert re.search(reason, capsys.readouterr().out)
    with pytest.raises(DataError, match="bands.npy member holds a float32"):
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((4, 4, 2), np.float32))
        write_shards([Sample("k", {"bands.npy": buffer.getvalue()})], tmp_path / "bad3", progress=False)


def test_transform_gives_in_chans_channels_with_one_geometry(tmp_path) -> None:
    ramp = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (16, 1))  # (16, 16), varies along the width
    rgba = Image.fromarray(np.stack([ramp] * 4, axis=-1), "RGBA")
    torch.manual_seed(0)
    out = ImageTransform(8, train=True, crop_scale=(0.3, 0.6), hflip=True, mean=[0.5] * 4, std=[0.5] * 4,
                         in_chans=4)(rgba)
    assert out.shape == (4, 8, 8)
    assert all(torch.equal(out[0], out[c]) for c in range(1, 4))  # the same crop and flip on every channel
    deep = np.full((8, 8, 2), 65535, np.uint16)
    two = ImageTransform(8, train=False, mean=[0.0, 0.0], std=[1.0, 1.0], in_chans=2)(deep)
    assert torch.allclose(two, torch.ones(2, 8, 8))
    grey16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    grey = ImageTransform(8, train=False, mean=[0.0], std=[1.0], in_chans=1)(grey16)  # 16-bit: scaled, not clipped
    assert torch.allclose(grey, torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="image has 1 channels, model.in_chans is 4"):
        ImageTransform(8, train=False, mean=[0.5] * 4, std=[0.5] * 4, in_chans=4)(Image.new("L", (8, 8)))
    # 1 and 3 channels still convert any 8-bit image (RGBA -> RGB, RGB -> grey)
    assert ImageTransform(8, train=False, in_chans=3)(rgba).shape == (3, 8, 8)
    assert ImageTransform(8, train=False, in_chans=1)(rgba.convert("RGB")).shape == (1, 8, 8)


def test_channel_stats_need_one_value_per_channel() -> None:
    assert channel_stats((0.3, 0.6, 0.9), (0.25, 0.25, 0.25), 1) == ((0.6,), (0.25,))
    assert channel_stats([0.5] * 4, [0.2] * 4, 4) == ((0.5,) * 4, (0.2,) * 4)
    with pytest.raises(ValueError, match=r"data\.mean has 3 values, model\.in_chans is 4"):
        channel_stats((0.5,) * 3, (0.5,) * 4, 4)
    with pytest.raises(ValueError, match=r"data\.std has 1 values, model\.in_chans is 2"):
        channel_stats((0.5,) * 2, (0.5,), 2)


def test_grey_demo_config_is_one_channel() -> None:
    config = load_config(REPO / "configs/demo/mae_gray.yaml")
    assert (config.model.in_chans, config.data.mean, config.data.std) == (1, (0.5,), (0.5,))


def test_driver_rejects_a_mean_of_the_wrong_length(demo_shards, tmp_path, capsys) -> None:
    code = launch("pretrain.py", "--config", str(REPO / "configs/demo/mae_gray.yaml"),
                  "--set", f"data.shards={demo_shards / 'train'}", "--set", "data.mean=[0.5,0.5]",
                  "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    err = own_lines(capsys.readouterr().err)
    assert code == 2, err
    assert err == ["error: data.mean has 2 values, model.in_chans is 1 (give one per channel, or 3 to average)"]
    assert not (tmp_path / "mlflow.db").exists()


def test_driver_rejects_data_with_another_channel_count(demo_shards) -> None:
    from maskray.run_spec import check_data

    config = load_config(REPO / "configs/demo/mae.yaml", [
        f"data.shards={demo_shards / 'train'}", "model.in_chans=4", "data.mean=[0.5,0.5,0.5,0.5]",
        "data.std=[0.5,0.5,0.5,0.5]"])
    with pytest.raises(DataError, match=r"data.shards: sample 'digits_\d+' of '.*shard-000000.tar' has 1 channels "
                                        r"but model.in_chans is 4"):
        check_data(config.resolved())


def _ray_overrides(tmp_path, shards: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.storage_path={tmp_path / 'runs'}", "scaling.workers=1", "data.num_workers=0",
            "data.batch_size=8", "train.steps=2", "train.log_every=1", "train.checkpoint_every=2",
            "optim.warmup_steps=1", *extra]


# The one-channel digits (configs/demo/mae_gray.yaml) train, evaluate and export in test_objectives_ray, with
# every demo config's few-step run.


@pytest.mark.slow
def test_four_band_tiffs_train_and_export(ray_session, tmp_path) -> None:
    rng = np.random.default_rng(0)
    source = tmp_path / "tiffs"
    source.mkdir()
    for index in range(32):
        first, rest = _tiff_bands(list(rng.integers(0, 256, (4, 16, 16), dtype=np.uint8)))
        first.save(source / f"{index:02d}.tif", save_all=True, append_images=rest)
    make_shards([str(source), str(tmp_path / "shards"), "--samples-per-shard", "8"])
    config = load_config(REPO / "configs/demo/mae.yaml", _ray_overrides(
        tmp_path, tmp_path / "shards", "model.in_chans=4", "data.mean=[0.5,0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25,0.25]", "eval.train_shards=null", "eval.test_shards=null"))
    from maskray.engine.driver import run_pretraining

    result = run_pretraining(config, run_name="bands")
    check_export(result, config, tmp_path / "bands.safetensors", 4)
    assert result.metrics["skipped_samples"] == 0
