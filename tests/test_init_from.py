"""``model.init_from``: maskray's export, timm state dicts (other image size, weights-only pickles), the MAE reference
and Hugging Face ViTMAE layouts load into the encoder; mismatches and missing files are one-line errors."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest
import timm
import torch
from helpers import free_port, launch, own_lines
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from maskray.checkpoint import load_encoder
from maskray.config import Config, ModelConfig, load_config
from maskray.errors import ConfigError
from maskray.export import export_encoder
from maskray.models import build_encoder, build_initial_encoder, load_pretrained, sincos_2d
from maskray.models.pretrained import detect_format
from maskray.run_spec import build_run_spec

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "tests" / "fixtures" / "pre_platform" / "runs" / "pre-platform" / "checkpoint_step2"
ARCH = "vit_tiny_patch16_224"


def _model(**overrides) -> ModelConfig:
    return ModelConfig(**{"img_size": 16, "patch_size": 4, "depth": 2, **overrides})


def _timm(seed: int, img_size: int = 16, depth: int = 2, arch: str = ARCH, num_classes: int = 0) -> torch.nn.Module:
    """A timm ViT with random weights everywhere (the position table and CLS token too)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, img_size=img_size, patch_size=4, depth=depth,
                              num_classes=num_classes)
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.02)
        model.cls_token.normal_(0, 0.02)
    return model.eval()


def _features(encoder, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval()(images).tokens


def _one_line_error(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "model.init_from" in message
    return message


def test_export_then_init_from_gives_identical_features(tmp_path) -> None:
    result = export_encoder(tmp_path / "encoder.safetensors", checkpoint=CHECKPOINT,
                            tracking_uri=f"sqlite:///{tmp_path / 'absent.db'}")
    trained, config = load_encoder(CHECKPOINT)
    model = config.model.model_copy(update={"init_from": str(result.path)})
    torch.manual_seed(123)  # other random weights underneath
    started = build_initial_encoder(model)
    images = torch.randn(3, 3, 16, 16)
    assert torch.equal(_features(started, images), _features(trained, images))
    assert not started.vit.pos_embed.requires_grad  # model.pos_embed sincos: still fixed


def test_timm_state_dict_of_another_image_size_gets_resampled_positions(tmp_path) -> None:
    source = _timm(0, img_size=32, num_classes=10)  # 8x8 grid, with a classifier
    state = source.state_dict()
    path = tmp_path / "vit32.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[4, 4], old_size=[8, 8])
    for pos_embed in ("learned", "sincos"):
        encoder = build_encoder(_model(pos_embed=pos_embed))
        loaded = load_pretrained(encoder, path)
        assert (loaded.format, loaded.resampled_from) == ("timm", (8, 8))
        assert torch.equal(encoder.vit.pos_embed, expected)  # the file's learned table, also under sincos
        assert not torch.allclose(encoder.vit.pos_embed, sincos_2d(192, (4, 4)))
        assert encoder.vit.pos_embed.requires_grad == (pos_embed == "learned")
        for key, value in encoder.vit.state_dict().items():
            if key != "pos_embed":
                assert torch.equal(value, state[key]), key


def test_pth_is_loaded_weights_only(tmp_path) -> None:
    state = _timm(1).state_dict()
    torch.save({"state_dict": state, "epoch": torch.tensor(3)}, tmp_path / "ok.pth")
    encoder = build_encoder(_model(pos_embed="learned"))
    assert load_pretrained(encoder, tmp_path / "ok.pth").format == "timm"
    assert torch.equal(encoder.vit.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])

    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")
    message = _one_line_error(lambda: load_pretrained(build_encoder(_model()), tmp_path / "pickled.pth"))
    assert "pickled.pth" in message and "weights_only=True" in message and "argparse.Namespace" in message


def test_mae_reference_checkpoint_maps_to_timm(tmp_path) -> None:
    """facebookresearch/mae ``models_mae.py`` layout: timm's encoder keys, plus the decoder's and ``mask_token``."""
    reference = _timm(2)
    with torch.no_grad():
        reference.pos_embed.copy_(sincos_2d(192, (4, 4)))  # MAE's fixed table
    generator = torch.Generator().manual_seed(0)
    decoder = {"decoder_embed.weight": (128, 192), "decoder_embed.bias": (128,), "mask_token": (1, 1, 128),
               "decoder_pos_embed": (1, 17, 128), "decoder_blocks.0.norm1.weight": (128,),
               "decoder_blocks.0.attn.qkv.weight": (384, 128), "decoder_norm.weight": (128,),
               "decoder_pred.weight": (48, 128), "decoder_pred.bias": (48,)}
    state = reference.state_dict() | {key: torch.randn(shape, generator=generator) for key, shape in decoder.items()}
    torch.save({"model": state}, tmp_path / "mae_visualize_vit_tiny.pth")
    assert detect_format(state) == "mae"
    encoder = build_encoder(_model())
    assert load_pretrained(encoder, tmp_path / "mae_visualize_vit_tiny.pth").format == "mae"
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(_features(encoder, images), reference.forward_features(images))


def _hf_vitmae(layer_norm_eps: float = 1e-6):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(
        hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768, image_size=16,
        patch_size=4, qkv_bias=True, layer_norm_eps=layer_norm_eps, mask_ratio=0.0, decoder_hidden_size=32,
        decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64,
    )
    torch.manual_seed(3)
    model = transformers.ViTMAEForPreTraining(config).eval()
    with torch.no_grad():  # random, so the test sees where the table goes (and its CLS slot)
        model.vit.embeddings.position_embeddings.normal_(0, 0.02)
    return model


def _hf_features(model, images: torch.Tensor) -> torch.Tensor:
    """(B, 1+L, D) HF ViTMAE encoder output in patch order: HF shuffles tokens even at mask_ratio 0."""
    with torch.no_grad():
        out = model.vit(images, noise=torch.rand(images.shape[0], 16, generator=torch.Generator().manual_seed(5)))
    tokens = out.last_hidden_state
    assert not torch.equal(out.ids_restore, torch.arange(16).expand_as(out.ids_restore))  # really shuffled
    index = out.ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.cat([tokens[:, :1], torch.gather(tokens[:, 1:], 1, index)], dim=1)


def test_hugging_face_vitmae_loads_with_equal_features(tmp_path) -> None:
    model = _hf_vitmae()
    model.save_pretrained(tmp_path / "hub")  # the hub's layout: encoder.layer.N.attention.attention.query, ...
    torch.save(model.state_dict(), tmp_path / "modules.pth")  # transformers 5's names: layers.N.attention.q_proj
    images = torch.randn(2, 3, 16, 16)
    expected = _hf_features(model, images)
    for path in (tmp_path / "hub" / "model.safetensors", tmp_path / "modules.pth"):
        encoder = build_encoder(_model(pos_embed="learned"))
        assert load_pretrained(encoder, path).format == "hf_vitmae"
        torch.testing.assert_close(_features(encoder, images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("source", "model", "fragment"),
    [
        (dict(depth=2), dict(depth=4), "missing key 'blocks.2.norm1.weight'"),
        (dict(depth=4), dict(depth=2), "unexpected key 'blocks.2."),
        (dict(arch="vit_small_patch16_224"), dict(), "'cls_token' has shape (1, 1, 384), the encoder's is (1, 1, 192)"),
    ],
)
def test_mismatched_architecture_names_the_first_bad_key(tmp_path, source, model, fragment) -> None:
    path = tmp_path / "other.safetensors"
    save_file(_timm(4, **source).state_dict(), str(path))
    message = _one_line_error(lambda: load_pretrained(build_encoder(_model(**model)), path))
    assert fragment in message and str(path) in message


def test_hugging_face_with_another_depth_names_the_mapped_key(tmp_path) -> None:
    _hf_vitmae().save_pretrained(tmp_path)
    message = _one_line_error(lambda: load_pretrained(build_encoder(_model(depth=3)), tmp_path / "model.safetensors"))
    assert "(hf_vitmae)" in message and "missing key 'blocks.2.norm1.weight'" in message


def test_relative_path_resolves_and_sha256_becomes_a_param(tmp_path) -> None:
    save_file(_timm(5).state_dict(), str(tmp_path / "enc.safetensors"))
    config = load_config(None, ["model.depth=2", "model.init_from=enc.safetensors"]).resolved(tmp_path)
    assert config.model.init_from == str(tmp_path / "enc.safetensors")
    params = build_run_spec(config, check_data_too=False).params
    assert params["model.init_from_sha256"] == hashlib.sha256((tmp_path / "enc.safetensors").read_bytes()).hexdigest()
    assert params["model.init_from"] == str(tmp_path / "enc.safetensors")
    assert "model.init_from_sha256" not in build_run_spec(Config(), check_data_too=False).params


def test_cli_missing_init_from_exits_2_with_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # the relative path resolves against the working directory
    assert launch("pretrain.py", "--set", "model.init_from=missing.safetensors") == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "model.init_from" in err[0] and str(tmp_path / "missing.safetensors") in err[0], err


@pytest.mark.slow
def test_a_launched_run_starts_from_the_file_and_logs_its_hash_without_a_tracking_server(
    ray_session, demo_shards, knn_shards, tmp_path, monkeypatch, caplog
) -> None:
    """Four steps through the launcher on Ray, with nothing listening at ``tracking.uri``: the run trains into the
    local fallback store (the driver's half of test_tracking_fallback.py), the sha256 param reaches it, and the
    step-0 k-NN baseline is the loaded encoder's."""
    import logging

    from maskray.eval.protocol import encoder_knn_metrics, eval_shard_sets

    monkeypatch.setattr(ray_session, "shutdown", lambda: None)  # the launcher's; the tests' Ray stays up
    monkeypatch.setenv("MASKRAY_ROOT", str(tmp_path))  # where the fallback store goes
    path = tmp_path / "start.safetensors"
    save_file(_timm(6).state_dict(), str(path))
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    overrides = [f"data.shards={demo_shards / 'train'}", f"eval.train_shards={knn_shards / 'train'}",
                 f"eval.test_shards={knn_shards / 'test'}", f"tracking.uri={uri}",
                 f"tracking.storage_path={tmp_path / 'runs'}", "model.depth=2", f"model.init_from={path}",
                 "scaling.workers=1", "data.num_workers=0", "data.batch_size=16", "train.steps=4",
                 "train.log_every=2"]
    with caplog.at_level(logging.WARNING, logger="maskray.tracking.mlflow_run"):
        code = launch("pretrain.py", "--config", str(REPO / "configs/demo/mae.yaml"), "--run-name", "from-file",
                      *[item for override in overrides for item in ("--set", override)])
    assert code == 0
    local = f"sqlite:///{tmp_path / 'mlflow-fallback.db'}"
    assert any(uri in r.getMessage() and local in r.getMessage() for r in caplog.records)
    client = MlflowClient(local)
    run = client.search_runs([client.get_experiment_by_name("maskray-demo").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["maskray.run_name"] == "from-file"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]

    assert run.data.params["model.init_from_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    config = load_config(REPO / "configs/demo/mae.yaml", overrides)
    start = build_initial_encoder(config.model)
    expected = encoder_knn_metrics(start, eval_shard_sets(config.resolved().eval), config)
    assert run.data.metrics["knn_top1_random_init"] == pytest.approx(expected["knn_top1"], abs=1e-6)
    trained, saved = load_encoder(next(p for p in (tmp_path / "runs" / "from-file").glob("checkpoint_*") if p.is_dir()))
    assert saved.model.init_from == str(path)
    assert not torch.equal(trained.vit.blocks[0].attn.qkv.weight, start.vit.blocks[0].attn.qkv.weight)
