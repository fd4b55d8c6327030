"""Figures logged to MLflow (matplotlib, headless Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def loss_curve_figure(logger) -> plt.Figure:
    """Training loss and learning rate over optimizer steps, read back from the run's metric history."""
    figure, (loss_axis, lr_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, key in ((loss_axis, "loss"), (lr_axis, "lr")):
        points = logger.metric_history(key)
        if points:
            steps, values = zip(*sorted(points), strict=True)
            axis.plot(steps, values)
        axis.set_xlabel("optimizer step")
        axis.set_title(key)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def image_rows_figure(rows: dict[str, torch.Tensor]) -> plt.Figure:
    """One row per entry: ``rows[name]`` is (N, C, H, W); each image is min-max scaled for display."""
    count = next(iter(rows.values())).shape[0]
    figure, axes = plt.subplots(len(rows), count, figsize=(1.2 * count, 1.3 * len(rows)), squeeze=False)
    for row, (name, images) in enumerate(rows.items()):
        for col in range(count):
            image = images[col].detach().float().cpu()
            image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-8)
            axis = axes[row, col]
            axis.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if image.shape[0] == 1 else None)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(name, fontsize=8)
    figure.tight_layout()
    return figure
