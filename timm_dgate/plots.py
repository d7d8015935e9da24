"""The accuracy-against-cost plot of a gated model: its trade-off curves, its profiles and the plain model."""

from __future__ import annotations

from collections.abc import Sequence
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
