"""Evaluation, comparison and export: known answers, MLflow round trips and a timm round trip."""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import launch, png_bytes
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from maskray.checkpoint import CONFIG_FILE, ENCODER_FILE
from maskray.config import load_config
from maskray.data import Sample, write_shards
from maskray.errors import ConfigError
from maskray.eval import knn_accuracy, knn_predict
from maskray.eval.diagnostics import (
    attention_nmi,
    diagnose,
    diagnostic_figure,
    fourier_high_freq,
    mean_attention_distance,
)
from maskray.eval.linear_probe import LinearProbeConfig, linear_probe
from maskray.eval.runner import EVAL_TAG, PARENT_TAG, EvalSettings, evaluate, resolve_target
from maskray.export import export_encoder
from maskray.models import build_encoder
from maskray.tracking import artifact_root_for, find_or_create_run
from maskray.tracking.compare import KIND_TAG, compare_runs, comparison_figure, format_table

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module (schema creation is the slow part)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


# ---------------------------------------------------------------- linear probe and k-NN, known answers (one
# scenario each, for both classifiers)


def _clusters(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(120)
    centers = 3.0 * torch.randn(10, 64, generator=generator)
    return centers[labels] + torch.randn(1200, 64, generator=generator), labels


def _classify(classifier: str, train: tuple, test: tuple) -> dict[str, float]:
    if classifier == "knn":
        return knn_accuracy(*train, *test, 10)
    return linear_probe(*train, *test, 10, LinearProbeConfig(epochs=30, warmup_epochs=3))


@pytest.mark.parametrize("classifier", ["knn", "linear_probe"])
def test_separable_features_are_classified_perfectly_and_deterministically(classifier) -> None:
    features, labels = _clusters(0)
    train, test = slice(0, None, 2), slice(1, None, 2)
    first = _classify(classifier, (features[train], labels[train]), (features[test], labels[test]))
    assert first == {"top1": 100.0, "top5": 100.0}
    assert _classify(classifier, (features[train], labels[train]), (features[test], labels[test])) == first


@pytest.mark.parametrize("classifier", ["knn", "linear_probe"])
def test_random_labels_give_chance_level(classifier) -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2000, 64, generator=generator)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    accuracy = _classify(classifier, (features[:1000], labels[:1000]), (features[1000:], labels[1000:]))
    assert accuracy["top1"] == pytest.approx(10.0, abs=3.5)
    assert accuracy["top5"] == pytest.approx(50.0, abs=6.0)


def test_knn_vote_weights_follow_temperature() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_predict(bank, labels, torch.tensor([[1.0, 0.0]]), 2, k=3, temperature=0.5)
    expected0 = torch.exp(torch.tensor(1.0 / 0.5))
    expected1 = torch.exp(torch.tensor(0.0)) + torch.exp(torch.tensor(0.6 / 0.5))
    torch.testing.assert_close(scores, torch.stack([expected0, expected1]).unsqueeze(0))


# ---------------------------------------------------------------- diagnostics, known values


def test_uniform_attention_gives_the_analytic_distance_and_zero_nmi() -> None:
    attn = torch.full((2, 3, 197, 197), 1 / 197)  # CLS included: dropped and rows renormalised
    distance = mean_attention_distance(attn, (14, 14), 16)
    cells = list(itertools.product(range(14), range(14)))
    analytic = 16 * np.mean([math.dist(a, b) for a in cells for b in cells])
    assert analytic == pytest.approx(116.49, abs=0.01)  # the spec's reference value
    torch.testing.assert_close(distance, torch.full((3,), analytic, dtype=torch.float64))
    assert attention_nmi(attn, (14, 14)).abs().max() < 1e-9


def test_identity_attention_gives_zero_distance_and_nmi_one() -> None:
    attn = torch.eye(1 + 6 * 5).expand(2, 4, -1, -1)  # a non-square 6x5 grid with CLS
    assert mean_attention_distance(attn, (6, 5), 8).abs().max() < 1e-12
    torch.testing.assert_close(attention_nmi(attn, (6, 5)), torch.ones(4, dtype=torch.float64), atol=1e-4, rtol=0)


def _circular_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(..., h, w) Gaussian blur with wrap-around, as an explicit sum of shifted copies (no FFT)."""
    height, width = maps.shape[-2:]
    out = torch.zeros_like(maps)
    total = 0.0
    offsets = itertools.product(range(-(height // 2), height - height // 2), range(-(width // 2), width - width // 2))
    for dy, dx in offsets:
        weight = math.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma))
        out += weight * torch.roll(maps, shifts=(dy, dx), dims=(-2, -1))
        total += weight
    return out / total


def test_fourier_measure_of_constant_white_and_blurred_maps() -> None:
    grid = (14, 14)
    assert fourier_high_freq(torch.zeros(2, 196, 4), grid) == 0.0  # every bin at the 1e-6 floor
    constant = fourier_high_freq(torch.full((2, 1 + 196, 4), 0.5), grid)  # CLS row dropped
    assert constant == pytest.approx(math.log(1e-6) - math.log(196 * 0.5 + 1e-6), abs=1e-6)  # no high frequency
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 16, 14, 14, generator=generator, dtype=torch.float64)  # 8 images x 16 channels
    white = fourier_high_freq(noise.flatten(2).transpose(1, 2), grid)
    blurred = fourier_high_freq(_circular_blur(noise, 1.5).flatten(2).transpose(1, 2), grid)
    assert white == pytest.approx(0.35, abs=0.25)
    assert blurred < white - 5


def test_diagnose_an_encoder_gives_per_layer_metrics_and_a_figure() -> None:
    torch.manual_seed(0)
    encoder = build_encoder(load_config(None).model)
    diagnostics = diagnose(encoder, torch.randn(10, 3, 16, 16), batch_size=4)
    assert diagnostics.attn_dist.shape == diagnostics.nmi.shape == (4, 3) and diagnostics.fourier.shape == (5,)
    metrics = diagnostics.metrics()
    assert {"diag_attn_dist_l1", "diag_nmi_l4", "diag_fourier_l0", "diag_fourier_l4"} <= set(metrics)
    assert len(metrics) == 4 + 4 + 5 and all(math.isfinite(value) for value in metrics.values())
    assert np.all(diagnostics.attn_dist > 0) and np.all(diagnostics.attn_dist < 4 * math.dist((0, 0), (3, 3)))
    buffer = io.BytesIO()
    diagnostic_figure(diagnostics).savefig(buffer, format="png")
    assert buffer.getvalue()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- compare


def _training_run(client, experiment_id, name, objective, start, losses, end=None, **metrics) -> str:
    run = client.create_run(experiment_id, start_time=start, run_name=name, tags={
        "maskray.run_name": name, "objective": objective, "backbone": "vit_tiny_patch16_224", "dataset": "digits"})
    run_id = run.info.run_id
    entries = [Metric("loss", value, start + 1000 * step, step) for step, value in losses]
    last_step, last_time = losses[-1][0], start + 1000 * losses[-1][0]
    entries += [Metric(key, value, last_time, 0 if key.endswith("_random_init") else last_step)
                for key, value in metrics.items()]
    client.log_batch(run_id, metrics=entries)
    client.set_terminated(run_id, "FINISHED", end_time=end)
    return run_id


def test_compare_two_objectives(store, tmp_path, capsys) -> None:
    client = MlflowClient(store)
    experiment_id = client.create_experiment("compare", artifact_location=artifact_root_for(store))
    start = 1_700_000_000_000
    mae = _training_run(client, experiment_id, "mae-a", "mae", start, [(10, 1.0), (20, 0.5)], start + 90_000,
                        images_per_s=400.0, knn_top1=70.0, knn_top1_random_init=55.0, linear_top1=75.0,
                        diag_attn_dist_l1=5.0, diag_attn_dist_l2=7.0, diag_nmi_l1=0.3, diag_nmi_l2=0.2,
                        diag_fourier_l0=-1.0, diag_fourier_l1=-2.0, diag_fourier_l2=-1.5)
    _training_run(client, experiment_id, "msn-b", "msn", start, [(10, 2.0), (30, 1.5)], start + 3_725_000,
                  images_per_s=250.0, knn_top1=80.0)
    client.create_run(experiment_id, run_name="mae-a-knn", tags={PARENT_TAG: mae, EVAL_TAG: "knn"})  # skipped

    rows = compare_runs(store, "compare")
    assert [row.name for row in rows] == ["msn-b", "mae-a"]  # sorted by knn_top1, largest first
    msn, mae_row = rows
    assert (msn.objective, msn.steps, msn.images_per_s, msn.final_loss, msn.knn_top1, msn.linear_top1) == (
        "msn", 30, 250.0, 1.5, 80.0, None)
    assert (mae_row.objective, mae_row.steps, mae_row.final_loss, mae_row.linear_top1) == ("mae", 20, 0.5, 75.0)
    assert (msn.wall_time_s, mae_row.wall_time_s) == (3725.0, 90.0)
    assert [row.name for row in compare_runs(store, "compare", sort_by="final_loss", ascending=True)] == [
        "mae-a", "msn-b"]
    assert [row.name for row in compare_runs(store, "compare", "tags.objective = 'msn'")] == ["msn-b"]

    table = format_table(rows)
    assert "80.00" in table and "75.00" in table and "1h02m" in table and "1m30s" in table
    figure = comparison_figure(client, rows, tmp_path / "direct.png")
    assert figure.stat().st_size > 0

    out = tmp_path / "figures" / "comparison.png"
    for _ in range(2):  # the comparison run is reused, not duplicated
        assert launch("compare.py", "--experiment", "compare", "--tracking-uri", store, "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "msn-b" in printed and "mae-a" in printed and out.stat().st_size > 0
    comparisons = client.search_runs([experiment_id], f"tags.`{KIND_TAG}` = 'comparison'")
    assert len(comparisons) == 1
    assert {item.path for item in client.list_artifacts(comparisons[0].info.run_id)} == {
        "comparison.png", "comparison.txt"}
    assert [row.name for row in compare_runs(store, "compare")] == ["msn-b", "mae-a"]  # comparison run skipped


def test_compare_missing_experiment_is_a_one_line_error(store, capsys) -> None:
    assert launch("compare.py", "--experiment", "no-such-experiment", "--tracking-uri", store) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-experiment" in err
    MlflowClient(store).create_experiment("filtered")
    with pytest.raises(ConfigError, match="filter"):
        compare_runs(store, "filtered", "tags.objective = = 'x'")


# ---------------------------------------------------------------- checkpoints, export, evaluate


def _write_checkpoint(directory: Path, config, seed: int, step: int | None) -> torch.nn.Module:
    """A checkpoint directory as the training loop writes it (minus the DeepSpeed shards)."""
    torch.manual_seed(seed)
    encoder = build_encoder(config.model)
    directory.mkdir(parents=True)
    save_file(encoder.timm_state_dict(), str(directory / ENCODER_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json")))
    if step is not None:
        (directory / "ds").mkdir()
        (directory / "ds" / "latest").write_text(f"step{step}")
    return encoder.eval()


def _run_for(config, run_name: str) -> str:
    tags = {"objective": config.objective.name, "backbone": config.model.arch, "dataset": "synthetic"}
    run_id, _ = find_or_create_run(config.tracking.uri, config.tracking.experiment, run_name, config.flat(), tags)
    return run_id


def test_export_round_trip_through_timm(store, tmp_path) -> None:
    config = load_config(None, [f"tracking.uri={store}", "tracking.experiment=export",
                                f"tracking.storage_path={tmp_path / 'runs'}"])
    encoder = _write_checkpoint(tmp_path / "runs" / "exported" / "checkpoint_000000", config, seed=3, step=7)
    run_id = _run_for(config, "exported")

    result = export_encoder(tmp_path / "out" / "vit.safetensors", run_id=run_id, tracking_uri=store)
    path = str(result.path)
    pretrained = timm.create_model(result.arch, pretrained=True, num_classes=0,
                                   pretrained_cfg_overlay=dict(file=path), **result.timm_kwargs).eval()
    by_checkpoint = timm.create_model(result.arch, num_classes=0, checkpoint_path=path, **result.timm_kwargs).eval()
    assert set(load_file(path)) == set(pretrained.state_dict())  # strict loads: no missing / unexpected keys
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = encoder(images).tokens
        torch.testing.assert_close(pretrained.forward_features(images), expected)
        torch.testing.assert_close(by_checkpoint.forward_features(images), expected)
    assert "pretrained_cfg_overlay=dict(file=" in result.create_model_call()
    artifacts = {item.path for item in MlflowClient(store).list_artifacts(run_id, "encoder")}
    assert artifacts == {"encoder/encoder.safetensors", "encoder/timm.json"}


def _labelled_shards(directory: Path, per_class: int, seed: int) -> str:
    """3 classes of 16x16 RGB noise images whose brightness depends on the class."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(3 * per_class):
        label = index % 3
        pixels = np.clip(40 + 80 * label + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        samples.append(Sample(key=f"s{index:04d}", image=png_bytes(pixels), ext="png", label=label))
    write_shards(samples, directory, samples_per_shard=32, progress=False)
    return str(directory)


def test_evaluate_twice_updates_the_same_run(ray_session, store, tmp_path) -> None:
    config = load_config(None, [
        f"eval.train_shards={_labelled_shards(tmp_path / 'train', 12, 0)}",
        f"eval.test_shards={_labelled_shards(tmp_path / 'test', 6, 1)}",
        f"tracking.uri={store}", "tracking.experiment=evaluate", f"tracking.storage_path={tmp_path / 'runs'}",
    ])
    run_dir = tmp_path / "runs" / "run-a"
    _write_checkpoint(run_dir / "checkpoint_000000", config, seed=0, step=5)
    run_id = _run_for(config, "run-a")
    client = MlflowClient(store)
    client.log_batch(run_id, metrics=[Metric("loss", 0.9, 0, 5)])
    with pytest.raises(ConfigError, match="not found"):
        resolve_target(store, "0" * 32)

    target = resolve_target(store, run_id)
    assert (Path(target.checkpoint).name, target.step) == ("checkpoint_000000", 5)
    assert resolve_target(checkpoint=target.checkpoint).run_id == run_id  # found by its Ray run name
    first = evaluate(target, EvalSettings(probe=LinearProbeConfig(epochs=10, warmup_epochs=1), diag_images=12))
    assert {"knn_top1", "knn_top5", "linear_top1", "linear_top5", "linear_top1_random_init",
            "diag_attn_dist_l4", "diag_nmi_l1", "diag_fourier_l0"} <= set(first)

    # training went on: a later checkpoint; the second evaluation goes through the launcher, same settings
    _write_checkpoint(run_dir / "checkpoint_000001", config, seed=1, step=10)
    assert launch("evaluate.py", "--run-id", run_id, "--tracking-uri", store, "--probe-epochs", "10",
                   "--diag-images", "12") == 0

    experiment_id = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([experiment_id])
    top_level = [run for run in runs if PARENT_TAG not in run.data.tags]
    children = {run.data.tags[EVAL_TAG]: run for run in runs if run.data.tags.get(PARENT_TAG) == run_id}
    assert [run.info.run_id for run in top_level] == [run_id] and len(runs) == 4
    assert set(children) == {"knn", "linear_probe", "diagnostics"}
    assert [metric.step for metric in client.get_metric_history(run_id, "knn_top1")] == [5, 10]
    probe_history = client.get_metric_history(children["linear_probe"].info.run_id, "linear_top1")
    assert [metric.step for metric in probe_history] == [5, 10]
    parent = client.get_run(run_id)
    assert parent.data.metrics["diag_attn_dist_l1"] != first["diag_attn_dist_l1"]  # the new checkpoint's value
    assert parent.data.tags["maskray.eval_step"] == "10"
    assert {item.path for item in client.list_artifacts(run_id, "eval")} == {"eval/diagnostics.png"}
    assert {item.path for item in client.list_artifacts(children["diagnostics"].info.run_id)} == {
        "diagnostics.png", "diagnostics.json"}
