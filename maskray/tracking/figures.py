"""Figures logged to MLflow (matplotlib, headless Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
