"""ToBo: frame pairs from one crop, the bottleneck path's isolation from the reference frame (it sees only the
reference CLS plus the target's visible tokens), the loss on removed target patches only, demo clips."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskray.config import DataConfig, ModelConfig
from maskray.context import StepContext
from maskray.data import FramePair
from maskray.data.sources import demo_clips, moving_digit_clip
from maskray.errors import ConfigError
from maskray.masking import masked_patch_loss, num_visible, patchify
from maskray.models import MaskedViT, MaskedViTCfg
from maskray.objective import build_objective, validate_objective
from maskray.passes import select
from objectives.tobo import ToBoDecoder, bottleneck_sequence

SIZE, PATCH, LENGTH = 32, 4, 64  # the demo geometry: 64 patches, 6 of them visible at mask ratio 0.9


def _encoder() -> MaskedViT:
    torch.manual_seed(0)
    return MaskedViT(MaskedViTCfg(arch="vit_tiny_patch16_224", img_size=SIZE, patch_size=PATCH, in_chans=3, depth=2))


def _objective(**params):
    params = {"decoder_dim": 32, "decoder_depth": 2, "decoder_heads": 2, **params}
    return build_objective("tobo", params, _encoder())


def _ctx(seed: int = 0) -> StepContext:
    return StepContext(step=0, total_steps=10, generator=torch.Generator().manual_seed(seed))


def _frames(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# --- inputs: frame pairs ---------------------------------------------------------------------------------------


def test_inputs_are_one_frame_pair_view_with_the_configured_gap_and_crop():
    objective = _objective(max_gap=3)
    data = DataConfig(crop_scale=(0.5, 1.0), hflip=True)
    views = objective.inputs(ModelConfig(img_size=SIZE, patch_size=PATCH), data)
    assert views.entries == {"frames": FramePair(SIZE, 3, crop_scale=(0.5, 1.0), hflip=True, mean=data.mean,
                                                 std=data.std, in_chans=3)}
    assert views.shapes() == {"frames": (2, 3, SIZE, SIZE)}


def test_select_picks_a_frame_of_a_stacked_pair():
    frames = _frames()
    assert torch.equal(select({"frames": frames}, "frames.1"), frames[:, 1])
    with pytest.raises(KeyError, match="frames.2"):
        select({"frames": frames}, "frames.2")


def test_moving_digit_clips_are_deterministic_moving_and_inside_the_canvas():
    digit = np.full((8, 8), 200, dtype=np.uint8)
    clip = moving_digit_clip(digit, seed=3)
    assert clip.shape == (8, 32, 32) and np.array_equal(clip, moving_digit_clip(digit, seed=3))
    assert all((frame > 0).sum() == 24 * 24 for frame in clip)  # the whole 24x24 sprite in every frame
    corners = [tuple(np.argwhere(frame > 0).min(axis=0)) for frame in clip]
    steps = [np.abs(np.subtract(b, a)) for a, b in zip(corners, corners[1:], strict=False)]
    assert all(step.max() in (1, 2) for step in steps)  # it moves 1..2 pixels per frame
    assert not np.array_equal(clip, moving_digit_clip(digit, seed=4))
    source = demo_clips("train")
    sample = source.load(0)
    assert source.total == 898 and sample.label == int(source.labels[0]) and list(sample.members) == ["npy"]
    frames = demo_clips("test", as_frames=True)
    assert frames.total == 899 and list(frames.load(0).members) == ["png"]


# --- the decoder: what the bottleneck path sees --------------------------------------------------------------------


def _decoder_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keep = num_visible(LENGTH, 0.9)
    reference = torch.randn(2, 1 + LENGTH, 16, generator=generator)
    target = torch.randn(2, 1 + keep, 16, generator=generator)
    ids_restore = torch.stack([torch.randperm(LENGTH, generator=generator) for _ in range(2)])
    return reference, target, ids_restore


def test_bottleneck_path_sees_the_reference_cls_only():
    torch.manual_seed(0)
    decoder = ToBoDecoder(16, (8, 8), 48, dim=32, depth=2, num_heads=2).eval()
    reference, target, ids_restore = _decoder_inputs()
    assert num_visible(LENGTH, 0.9) == 6
    bottleneck, aux = decoder(reference, target, ids_restore)
    assert bottleneck.shape == aux.shape == (2, LENGTH, 48)

    other_patches = reference.clone()
    other_patches[:, 1:] = torch.randn_like(other_patches[:, 1:])
    bottleneck_2, aux_2 = decoder(other_patches, target, ids_restore)
    assert torch.equal(bottleneck_2, bottleneck)  # bit-identical: no reference patch token enters
    assert not torch.allclose(aux_2, aux)  # the auxiliary path cross-attends to them

    other_cls = reference.clone()
    other_cls[:, 0] += 1.0
    assert not torch.allclose(decoder(other_cls, target, ids_restore)[0], bottleneck)

    other_target_cls = target.clone()
    other_target_cls[:, 0] += 1.0
    bottleneck_3, aux_3 = decoder(reference, other_target_cls, ids_restore)
    assert torch.equal(bottleneck_3, bottleneck)  # the target's own CLS is not used by the bottleneck path
    assert not torch.allclose(aux_3, aux)


def test_bottleneck_sequence_is_the_reference_cls_then_the_target_rows():
    reference_cls, target_sequence, cls_pos = torch.randn(2, 1, 8), torch.randn(2, 1 + LENGTH, 8), torch.randn(1, 1, 8)
    sequence = bottleneck_sequence(reference_cls, target_sequence, cls_pos)
    assert sequence.shape == (2, 1 + LENGTH, 8)
    assert torch.equal(sequence[:, :1], reference_cls + cls_pos)
    assert torch.equal(sequence[:, 1:], target_sequence[:, 1:])
    with pytest.raises(ValueError, match="one token"):
        bottleneck_sequence(torch.randn(2, 2, 8), target_sequence, cls_pos)


def test_decoder_refuses_a_masked_reference_and_aux_without_cross_attention():
    reference, target, ids_restore = _decoder_inputs()
    with pytest.raises(ValueError, match="whole"):
        ToBoDecoder(16, (8, 8), 48, dim=32, depth=1, num_heads=2)(reference[:, :7], target, ids_restore)
    with pytest.raises(ValueError, match="cross"):
        ToBoDecoder(16, (8, 8), 48, dim=32, depth=1, num_heads=2, cross=False)(reference, target, ids_restore)


# --- the objective: passes, loss ----------------------------------------------------------------------------------


def test_passes_encode_the_whole_reference_and_a_tenth_of_the_target():
    objective = _objective()
    passes = objective.passes()
    assert passes["reference"].view == "frames.0" and passes["reference"].mask is None
    assert passes["target"].view == "frames.1" and passes["target"].mask.ratio == 0.9
    from maskray.passes import run_passes

    outputs = run_passes(objective.encoder, {"frames": _frames()}, passes, torch.Generator().manual_seed(0))
    assert outputs["reference"].out.tokens.shape == (3, 1 + LENGTH, 192)
    assert outputs["target"].out.tokens.shape == (3, 1 + 6, 192)
    assert outputs["target"].mask.sum(1).tolist() == [LENGTH - 6] * 3


def test_bottleneck_prediction_ignores_the_hidden_target_pixels():
    """The bottleneck path gets the target only through its visible patches (and the reference's CLS)."""
    objective = _objective(w_mim=0.0).eval()
    frames = _frames()
    outputs = objective.passes()
    from maskray.passes import run_passes

    def predict(batch_frames):
        out = run_passes(objective.encoder, {"frames": batch_frames}, outputs, torch.Generator().manual_seed(0))
        pred, _ = objective.decoder(out["reference"].out.tokens, out["target"].out.tokens,
                                    out["target"].indices.ids_restore, aux=False)
        return pred, out["target"].mask

    pred, mask = predict(frames)
    hidden = patchify(frames[:, 1], PATCH)
    hidden[mask.bool()] = torch.randn_like(hidden[mask.bool()])
    changed = frames.clone()
    changed[:, 1] = hidden.reshape(3, 8, 8, PATCH, PATCH, 3).permute(0, 5, 1, 3, 2, 4).reshape(3, 3, SIZE, SIZE)
    assert not torch.equal(changed, frames)
    assert torch.allclose(predict(changed)[0], pred, atol=1e-6)


def test_loss_is_on_the_removed_target_patches_only(monkeypatch):
    objective = _objective()
    frames = _frames()
    from maskray.passes import run_passes

    outputs = run_passes(objective.encoder, {"frames": frames}, objective.passes(), torch.Generator().manual_seed(0))
    mask = outputs["target"].mask
    target = patchify(frames[:, 1], PATCH)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    exact = normed.clone()
    exact[~mask.bool()] += 100.0  # garbage on visible patches
    wrong = torch.zeros_like(normed)
    monkeypatch.setattr(objective.decoder, "forward", lambda *args, **kwargs: (exact, wrong))
    result = objective.loss({"frames": frames}, outputs, _ctx())
    assert result.metrics["loss_bottleneck"].item() == pytest.approx(0.0, abs=1e-10)
    expected_aux = masked_patch_loss(wrong, frames[:, 1], mask, PATCH)
    assert result.metrics["loss_aux"].item() == pytest.approx(expected_aux.item())
    assert result.loss.item() == pytest.approx(expected_aux.item())  # w_tobo = w_mim = 1
    assert result.metrics["mask_ratio"].item() == pytest.approx(58 / 64)


def test_weights_choose_the_paths_and_w_mim_zero_builds_no_cross_attention():
    objective = _objective(w_mim=0.0)
    assert not any("cross_attn" in name or "norm_kv" in name for name, _ in objective.named_parameters())
    result = objective({"frames": _frames()}, _ctx())
    assert set(result.metrics) == {"mask_ratio", "loss_bottleneck"}
    assert result.loss.item() == pytest.approx(result.metrics["loss_bottleneck"].item())
    result.loss.backward()
    assert all(p.grad is not None for p in objective.parameters() if p.requires_grad)

    both = _objective(w_tobo=2.0, w_mim=0.5)
    result = both({"frames": _frames()}, _ctx())
    expected = 2.0 * result.metrics["loss_bottleneck"] + 0.5 * result.metrics["loss_aux"]
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    result.loss.backward()
    assert all(p.grad is not None for p in both.parameters() if p.requires_grad)


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="objective.w_tobo"):
        validate_objective("tobo", {"w_tobo": 0.0, "w_mim": 0.0})
    with pytest.raises(ConfigError, match="objective.decoder_dim"):
        validate_objective("tobo", {"decoder_dim": 30, "decoder_heads": 4})
    with pytest.raises(ConfigError, match="objective.max_gap"):
        validate_objective("tobo", {"max_gap": 0})


# --- the pair-distance check (benchmarks/pair_distance.py) --------------------------------------------------------


def test_pair_distance_triplets_respect_the_gaps_and_the_clip():
    sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # last: not the objectives package
    from pair_distance import centered, closer_share, sample_triplets

    triplets = sample_triplets([40, 10, 33], (1, 2), (16, 31), 300, np.random.default_rng(0))
    clips, anchors, near, far = triplets.T
    assert set(clips) == {0, 2}  # clip 1 is too short for a gap of 31
    assert ((near - anchors >= 1) & (near - anchors <= 2)).all()
    assert ((far - anchors >= 16) & (far - anchors <= 31)).all()
    assert (far < np.array([40, 10, 33])[clips]).all()
    with pytest.raises(ValueError, match="small gaps"):
        sample_triplets([40], (1, 20), (16, 31), 3, np.random.default_rng(0))
    anchor = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    share = closer_share(anchor, torch.tensor([[1.0, 0.1], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert share["closer"] == 0.5 and share["sim_far"] == pytest.approx(0.5)
    shifted = centered(anchor + 5.0, anchor + 5.0)
    assert torch.allclose(torch.cat(shifted), torch.zeros(4, 2))
