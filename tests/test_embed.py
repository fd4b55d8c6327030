"""Embedding a folder or shards: rows are the encoder's features of exactly the input images, once each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import launch
from PIL import Image
from safetensors.torch import load_file, save_file

from maskray.checkpoint import ENCODER_FILE, load_encoder
from maskray.data import ImageTransform, Sample, image_folder, write_shards
from maskray.errors import ConfigError, DataError
from maskray.eval import embed as embed_module
from maskray.eval.embed import batches, embed, resolve_encoder, resolve_inputs
from maskray.export import export_encoder
from maskray.models import MaskedViT, MaskedViTCfg
from maskray.teachers import file_sha256
from maskray.weights import init_kwargs_from_timm, load_weights, read_weights_metadata

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "tests" / "fixtures" / "pre_platform" / "runs" / "pre-platform" / "checkpoint_step2"
# relative name -> (height, width, mode); 7 images, so batches of 3 end with a partial one
IMAGES = {"cat/a.png": (16, 16, "RGB"), "cat/b.png": (20, 24, "RGB"), "cat/sub/c.png": (16, 16, "L"),
          "dog/d.png": (32, 16, "RGB"), "dog/e.jpg": (16, 16, "RGB"), "dog/f.png": (16, 16, "RGBA"),
          "top.png": (18, 18, "RGB")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """``folder``: the IMAGES (plus a hidden image and a text file, both ignored); ``shards``: the same images as
    shards of 3 samples (keys = names); ``checkpoint``: a copy of the pre-platform checkpoint (no MLflow store)."""
    root = tmp_path_factory.mktemp("embed")
    rng = np.random.default_rng(0)
    samples = []
    for index, (name, (height, width, mode)) in enumerate(IMAGES.items()):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
        path = root / "folder" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        label = {"cat": 0, "dog": 1}.get(name.split("/")[0])
        samples.append(Sample(key=f"k{index}", image=path.read_bytes(), ext=path.suffix[1:], label=label))
    (root / "folder" / ".hidden.png").write_bytes((root / "folder" / "top.png").read_bytes())
    (root / "folder" / "notes.txt").write_text("not an image")
    write_shards(samples, root / "shards", samples_per_shard=3, class_names=("cat", "dog"), progress=False)
    shutil.copytree(CHECKPOINT, root / "checkpoint")
    return {"folder": root / "folder", "shards": root / "shards", "checkpoint": root / "checkpoint",
            "absent_store": f"sqlite:///{root / 'absent.db'}"}


def _expected(checkpoint: Path, folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """name -> {"cls", "mean"}: the encoder run directly on each image (one at a time) through the eval transform."""
    encoder, config = load_encoder(checkpoint)
    encoder.eval()
    transform = ImageTransform.for_eval(config.model, config.data)
    expected = {}
    with torch.no_grad():
        for name in IMAGES:
            out = encoder(transform(Image.open(folder / name))[None])
            expected[name] = {"cls": out.cls[0].numpy(), "mean": out.patches[0].mean(0).numpy()}
    return expected


def _check_rows(path: Path, expected: dict[str, dict[str, np.ndarray]], ids: dict[str, str]) -> pq.ParquetFile:
    """The rows of ``path`` are exactly ``ids`` (row id -> image name), once each, with the expected features."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    assert sorted(row["id"] for row in rows) == sorted(ids)  # every input once, nothing else
    for row in rows:
        want = expected[ids[row["id"]]]
        for feature in ("cls", "mean"):
            np.testing.assert_allclose(np.array(row[feature], dtype=np.float32), want[feature], atol=1e-5, rtol=0)
        top = ids[row["id"]].split("/")[0]
        assert (row["label"], row["class_name"]) == {"cat": (0, "cat"), "dog": (1, "dog")}.get(top, (-1, None))
    assert str(table.schema.field("cls").type) == "fixed_size_list<element: float>[192]"
    return table.schema.metadata


def test_embed_a_folder_through_the_launcher_and_refuse_to_overwrite(ray_session, inputs, tmp_path, capsys) -> None:
    out = tmp_path / "embeddings.parquet"
    args = ["--checkpoint", str(inputs["checkpoint"]), "--tracking-uri", inputs["absent_store"],
            "--data", str(inputs["folder"]), "--out", str(out), "--batch-size", "3"]
    assert launch("embed.py", *args) == 0
    assert "wrote 7 rows" in capsys.readouterr().out
    metadata = _check_rows(out, _expected(inputs["checkpoint"], inputs["folder"]), {name: name for name in IMAGES})
    source = json.loads(metadata[b"maskray.source"])
    assert (source["kind"], source["run_id"], source["step"]) == ("checkpoint", None, 2)
    assert source["sha256"] == file_sha256(inputs["checkpoint"] / ENCODER_FILE)
    assert set(json.loads(metadata[b"maskray.features"])) == {"cls", "mean"}
    assert metadata[b"maskray.arch"] == b"vit_tiny_patch16_224"

    written = out.read_bytes()
    assert launch("embed.py", *args) == 2
    # the first run's progress bar (Ray worker lines "(pid=...) ...", and blanks) may still be arriving on stderr
    lines = capsys.readouterr().err.splitlines()
    (err,) = [line for line in lines if line.strip() and not line.startswith(("(", "\x1b[2m\x1b[36m("))]
    assert err.startswith("error: --out:") and "--overwrite" in err and str(out) in err
    assert out.read_bytes() == written
    assert launch("embed.py", *args, "--overwrite", "--batch-size", "7") == 0
    _check_rows(out, _expected(inputs["checkpoint"], inputs["folder"]), {name: name for name in IMAGES})
    assert not list(tmp_path.glob("*.partial"))


def test_embed_shards_and_exported_weights(ray_session, inputs, tmp_path) -> None:
    expected = _expected(inputs["checkpoint"], inputs["folder"])
    out = tmp_path / "shards.parquet"
    result = embed(out, inputs["shards"], checkpoint=inputs["checkpoint"], tracking_uri=inputs["absent_store"],
                   batch_size=2)
    assert (result.rows, result.dim) == (7, 192)
    _check_rows(out, expected, {f"k{index}": name for index, name in enumerate(IMAGES)})

    weights = export_encoder(tmp_path / "vit.safetensors", checkpoint=inputs["checkpoint"],
                             tracking_uri=inputs["absent_store"]).path
    out = tmp_path / "weights.parquet"
    embed(out, inputs["folder"], weights=weights, batch_size=4)  # the demo's mean/std are the default
    metadata = _check_rows(out, expected, {name: name for name in IMAGES})
    source = json.loads(metadata[b"maskray.source"])
    assert (source["kind"], source["weights"], source["sha256"]) == ("weights", str(weights), file_sha256(weights))


def test_refusing_to_overwrite_happens_before_ray(inputs, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(embed_module, "run_as_task", lambda *args: pytest.fail("the Ray task was started"))
    out = tmp_path / "taken.parquet"
    out.write_bytes(b"keep")
    with pytest.raises(ConfigError, match="--overwrite"):
        embed(out, inputs["folder"], checkpoint=inputs["checkpoint"])
    assert out.read_bytes() == b"keep"


def test_bad_inputs_are_one_line_errors(inputs, tmp_path) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_encoder(checkpoint=inputs["checkpoint"], weights=tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match="--weights only"):
        resolve_encoder(checkpoint=inputs["checkpoint"], mean=(0.4,), tracking_uri=inputs["absent_store"])
    (tmp_path / "w.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="--weights: cannot read"):
        resolve_encoder(weights=tmp_path / "w.safetensors")
    weights = export_encoder(tmp_path / "vit.safetensors", checkpoint=inputs["checkpoint"],
                             tracking_uri=inputs["absent_store"]).path
    source = resolve_encoder(weights=weights, mean=(0.4, 0.3, 0.2), std=(0.2, 0.2, 0.2))
    assert source.transform == ImageTransform(16, train=False, mean=(0.4, 0.3, 0.2), std=(0.2,) * 3, in_chans=3)
    with pytest.raises(ConfigError, match="--mean/--std: give 1 or 3 values"):
        resolve_encoder(weights=weights, mean=(0.4, 0.3), std=(0.2, 0.2))
    with pytest.raises(DataError, match="not a directory"):
        resolve_inputs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        resolve_inputs(tmp_path / "empty")
    transform = resolve_encoder(checkpoint=inputs["checkpoint"], tracking_uri=inputs["absent_store"]).transform
    shutil.copytree(inputs["folder"], tmp_path / "broken")
    (tmp_path / "broken" / "dog" / "z.png").write_bytes(b"truncated")
    with pytest.raises(DataError, match="z.png"):
        list(batches(resolve_inputs(tmp_path / "broken"), transform, 3))
    samples = [Sample("good", image=(inputs["folder"] / "top.png").read_bytes(), ext="png"),
               Sample("bad", image=b"truncated", ext="png")]
    shards = write_shards(samples, tmp_path / "bad_shards", progress=False)
    with pytest.raises(DataError, match="1 of the 2 samples"):
        list(batches(shards, transform, 3))


def test_folder_labels_are_those_make_shards_gives(inputs) -> None:
    folder = resolve_inputs(inputs["folder"])
    source = image_folder(inputs["folder"])
    assert folder.files == tuple(sorted(IMAGES))
    assert (folder.labels, folder.class_names) == (tuple(source.labels.tolist()), source.class_names)


@pytest.mark.parametrize("kwargs", [
    dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, layer_scale=0.1),
    dict(arch="vit_tiny_patch16_224", img_size=24, patch_size=8, in_chans=1),
    dict(arch="beit_base_patch16_224", img_size=16, patch_size=8, depth=1, pos_embed="none", rel_pos_bias="both"),
])
def test_old_exports_without_init_kwargs_rebuild_the_encoder(tmp_path, kwargs) -> None:
    torch.manual_seed(0)
    encoder = MaskedViT(MaskedViTCfg(**kwargs)).eval()
    derived = init_kwargs_from_timm(encoder.arch, encoder.timm_kwargs)
    assert derived == {key: value for key, value in encoder.init_kwargs.items() if key != "drop_path_rate"}
    old = tmp_path / "old.safetensors"
    metadata = {"format": "pt", "arch": encoder.arch, "timm_kwargs": json.dumps(encoder.timm_kwargs)}
    save_file(encoder.timm_state_dict(), str(old), metadata=metadata)
    assert "init_kwargs" not in read_weights_metadata(old)
    images = torch.randn(2, encoder.in_chans, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(load_weights(old).eval()(images).tokens, encoder(images).tokens)
    assert set(load_file(str(old))) == set(encoder.timm_state_dict())
