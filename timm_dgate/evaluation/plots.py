"""Plots of a gated model: accuracy against cost (curves, profiles, the plain model) and where each class exits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_tradeoff(
    curves: dict[str, Sequence[tuple[float, float]]],
    plain: tuple[float, float],
    path: str | Path,
    *,
    split: str,
    profiles: Sequence[tuple[str, float, float]] = (),
    title: str = "",
) -> Path:
    """Save a PNG of ``(accuracy, GFLOPs)`` curves, named profile points and the plain model's point.

    Accuracies are fractions; ``split`` names the data every point was measured on.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, points in curves.items():
        ax.plot([g for _, g in points], [100 * a for a, _ in points], marker=".", label=label)
    at: dict[tuple[float, float], list[str]] = {}  # profiles that land on one point share one label
    for name, accuracy, gflops in profiles:
        at.setdefault((gflops, 100 * accuracy), []).append(name)
    for point, names in at.items():
        ax.scatter(*point, marker="x", zorder=4)
        ax.annotate(", ".join(names), point, fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.scatter([plain[1]], [100 * plain[0]], color="black", zorder=5, label="plain model")
    ax.set_xlabel("average GFLOPs per image (gates included)")
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_title(title or f"Accuracy against cost on the {split} split", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_exits_per_class(
    panels: Mapping[str, Sequence[Sequence[int]]],
    class_names: Sequence[str],
    exit_names: Sequence[str],
    path: str | Path,
    *,
    split: str,
    title: str = "",
) -> Path:
    """Save a PNG of stacked bars, one per class: the share of the class's images leaving at each exit.

    ``panels`` maps each panel's title to counts ``[exit][class]`` (rows: gates then head, as in
    ``ProfileResult.exits_per_class``); ``exit_names`` names those rows, ``split`` the data counted.
    One panel per entry, side by side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (panel, exits) in zip(axes[0], panels.items()):
        counts = torch.tensor(exits, dtype=torch.float64)
        shares = counts / counts.sum(0, keepdim=True).clamp_min(1)
        bottom = torch.zeros(shares.shape[1], dtype=torch.float64)
        for row, label in zip(shares, exit_names):
            ax.bar(range(len(class_names)), 100 * row, bottom=100 * bottom, label=label)
            bottom += row
        ax.set_xticks(range(len(class_names)), class_names, rotation=35, ha="right")
        ax.set_title(panel, fontsize=10)
    axes[0][0].set_ylabel(f"% of the class's {split} images")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not on them
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
