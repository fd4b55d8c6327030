"""VQ-KD tokenizer: cosine nearest codes, the norm-EMA formula, k-means init, dead-code restarts, straight-through
and commitment, exact state round trip, codebook usage over a short training on demo digits, artifact round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import demo_digits, tiny_vqkd

from maskray.context import StepContext
from objectives.vqkd import (
    NormEMAQuantizer,
    TokenizerSource,
    codebook_perplexity,
    cosine_kmeans,
    ema_codebook,
    l2_normalise,
    load_tokenizer,
    nearest_codes,
    save_tokenizer,
)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return l2_normalise(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def test_codes_are_nearest_neighbours_in_cosine_space() -> None:
    z, codebook = unit(50, 8, seed=1), unit(16, 8, seed=2)
    codes = nearest_codes(z, codebook)
    cosine = F.cosine_similarity(z.unsqueeze(1), codebook.unsqueeze(0), dim=-1)  # (50, 16)
    assert torch.equal(codes, cosine.argmax(dim=1))
    assert torch.equal(codes, torch.cdist(z, codebook).argmin(dim=1))  # unit rows: nearest = highest cosine


def test_ema_update_matches_the_formula() -> None:
    codebook, z = unit(3, 4, seed=3), unit(5, 4, seed=4)
    codes = torch.tensor([0, 0, 2, 0, 2])
    counts = torch.tensor([3.0, 0.0, 2.0])
    sums = torch.stack([z[[0, 1, 3]].sum(0), torch.zeros(4), z[[2, 4]].sum(0)])
    new = ema_codebook(codebook, counts, sums, decay=0.9)
    for k, rows in ((0, [0, 1, 3]), (2, [2, 4])):
        mean = F.normalize(z[rows].mean(0), dim=0)
        torch.testing.assert_close(new[k], F.normalize(0.9 * codebook[k] + 0.1 * mean, dim=0))
    torch.testing.assert_close(new[1], codebook[1])  # unused: unchanged
    quantizer = NormEMAQuantizer(3, 4, decay=0.9, restart_after=0).train()
    quantizer.codebook.copy_(codebook)
    quantizer.initialised.fill_(True)
    assert torch.equal(quantizer(z).codes, nearest_codes(z, codebook))
    expected_counts = torch.bincount(nearest_codes(z, codebook), minlength=3).float()
    expected_sums = torch.zeros(3, 4).index_add_(0, nearest_codes(z, codebook), z)
    torch.testing.assert_close(quantizer.codebook, ema_codebook(codebook, expected_counts, expected_sums, 0.9))
    torch.testing.assert_close(quantizer.codebook.norm(dim=1), torch.ones(3))
    del codes


def test_straight_through_and_commitment() -> None:
    quantizer = NormEMAQuantizer(6, 4, beta=1.0, restart_after=0).eval()
    quantizer.codebook.copy_(unit(6, 4, seed=5))
    raw = torch.randn(10, 4, requires_grad=True)
    out = quantizer(raw)
    torch.testing.assert_close(out.quantized, quantizer.codebook[out.codes])
    weights = torch.randn(10, 4)
    (grad,) = torch.autograd.grad((out.quantized * weights).sum(), raw)
    reference = raw.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((l2_normalise(reference) * weights).sum(), reference)
    torch.testing.assert_close(grad, expected)  # identity through the quantization, then the normalisation
    cos = (l2_normalise(raw.detach()) * quantizer.codebook[out.codes]).sum(-1)
    torch.testing.assert_close(out.commitment, ((2 - 2 * cos) / 4).mean())


def test_kmeans_init_on_first_training_batch_and_eval_keeps_the_codebook() -> None:
    centres = unit(4, 8, seed=6)
    z = l2_normalise(centres.repeat_interleave(25, 0) + 0.01 * torch.randn(100, 8))
    means, counts = cosine_kmeans(z, 4, 10, torch.Generator().manual_seed(0))
    assert sorted(counts.tolist()) == [25, 25, 25, 25]
    assert (means @ centres.t()).max(dim=0).values.min() > 0.99
    quantizer = NormEMAQuantizer(4, 8)
    quantizer.eval()(z)
    assert not quantizer.initialised and torch.all(quantizer.codebook == 0)  # eval never initialises or updates
    quantizer.train()(z, torch.Generator().manual_seed(0))
    assert quantizer.initialised
    frozen = quantizer.codebook.clone()
    quantizer.eval()(unit(30, 8, seed=7))
    assert torch.equal(quantizer.codebook, frozen)


def test_dead_codes_are_restarted_from_encoder_outputs() -> None:
    quantizer = NormEMAQuantizer(4, 3, restart_after=2).train()
    quantizer.initialised.fill_(True)
    quantizer.codebook.copy_(torch.eye(4, 3) + torch.tensor([[0, 0, 0]] * 3 + [[0, 0, -2.0]]))  # code 3: (0,0,-1)
    quantizer.codebook.copy_(l2_normalise(quantizer.codebook))
    z = l2_normalise(torch.tensor([[1.0, 0.1, 0.2], [0.1, 1.0, 0.2], [0.2, 0.1, 1.0]]))  # never near code 3
    quantizer(z)
    assert quantizer.idle.tolist() == [0, 0, 0, 1]
    quantizer(z)  # the second idle forward: code 3 restarts from one of the rows of z
    assert quantizer.idle.tolist() == [0, 0, 0, 0]
    assert torch.isclose(quantizer.codebook[3] @ z.t(), torch.tensor(1.0)).any()
    off = NormEMAQuantizer(4, 3, restart_after=0).train()
    off.initialised.fill_(True)
    off.codebook.copy_(torch.eye(4, 3) - torch.tensor([[0, 0, 0]] * 3 + [[0, 0, 1.0]]))
    for _ in range(3):
        off(z)
    assert off.idle[3] == 3 and off.codebook[3, 2] < 0  # restarts off: the dead code stays


def test_state_round_trip_continues_exactly_and_stays_fp32() -> None:
    first = NormEMAQuantizer(8, 4).train()
    generator = torch.Generator().manual_seed(0)
    for seed in range(3):
        first(torch.randn(40, 4, generator=torch.Generator().manual_seed(seed)), generator)
    second = NormEMAQuantizer(8, 4).train()
    second.load_state_dict(first.state_dict())
    batch = torch.randn(40, 4)
    assert torch.equal(first(batch).codes, second(batch).codes)
    assert torch.equal(first.codebook, second.codebook) and torch.equal(first.idle, second.idle)
    assert second.bfloat16().codebook.dtype == torch.float32


def train(objective, images: torch.Tensor, steps: int, batch: int = 16) -> list[dict[str, float]]:
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    history = []
    for step in range(steps):
        pixels = images[torch.randint(0, len(images), (batch,), generator=generator)]
        out = objective({"crop": [(pixels - 0.5) / 0.5, pixels]}, StepContext(step, steps, generator=generator))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append({"loss": out.loss.item(), **{key: float(value) for key, value in out.metrics.items()}})
    return history


def test_usage_perplexity_rises_over_a_short_training(one_thread) -> None:
    """From a random encoder, k-means on the first batch gives few distinct codes once the encoder moves; the EMA
    and the restarts spread the assignments: the perplexity of the last steps is well above the early one's, and
    the reconstruction loss falls."""
    history = train(tiny_vqkd(), demo_digits(16, 256), steps=40)
    early = min(h["codebook_perplexity"] for h in history[1:6])
    late = sum(h["codebook_perplexity"] for h in history[-5:]) / 5
    assert late > 1.5 * early, (early, late)
    assert sum(h["reconstruction"] for h in history[-5:]) < sum(h["reconstruction"] for h in history[:5])


def test_tokenizer_artifact_round_trip(tmp_path, one_thread) -> None:
    objective = tiny_vqkd()
    images = demo_digits(16, 32)
    train(objective, images, steps=2)
    with pytest.raises(ValueError, match="never initialised"):
        save_tokenizer(tmp_path / "fresh", tiny_vqkd().tokenizer((0.5,) * 3, (0.5,) * 3))
    save_tokenizer(tmp_path / "tok", objective.tokenizer((0.5,) * 3, (0.5,) * 3))
    loaded, source, sha256 = load_tokenizer(TokenizerSource(path=str(tmp_path / "tok")))
    objective.eval()
    with torch.no_grad():
        expected = objective.tokenizer((0.5,) * 3, (0.5,) * 3)(images)
        assert torch.equal(loaded(images), expected)
    assert expected.shape == (32, 16) and source == str((tmp_path / "tok").resolve()) and len(sha256) == 64
    assert torch.equal(loaded.quantizer.codebook, objective.quantizer.codebook)
    assert codebook_perplexity(torch.bincount(expected.flatten(), minlength=16)) > 1


def test_tokenizer_source_needs_one_place(tmp_path) -> None:
    from maskray.errors import ConfigError

    for source in (TokenizerSource(), TokenizerSource(path="a", run_id="b")):
        with pytest.raises(ConfigError, match="objective.tokenizer.run_id"):
            source.check("objective.tokenizer")
    with pytest.raises(ConfigError, match="no tokenizer directory"):
        load_tokenizer(TokenizerSource(path=str(tmp_path)))
    resolved = TokenizerSource(path="tok").resolved(tmp_path, "sqlite:///x.db")
    assert resolved.path == str(tmp_path / "tok") and resolved.tracking_uri is None
    assert TokenizerSource(run_id="r").resolved(tmp_path, "sqlite:///x.db").tracking_uri == "sqlite:///x.db"


# The codebook state resuming exactly from a training checkpoint (codebook, k-means flag, idle counters, the next
# forward's codes and update): test_objective_platform.py::test_training_state_round_trip_is_bit_exact[vqkd].
