"""timm_dgate's own methods as the comparison sees them: hinge d-gates and two cross-entropy baselines.

Why one adapter: the three differ only in the gates' loss and the exit score, so they share
one wrapped model per loss, one validation and one test cache, and the same threshold search.
Thresholds are always chosen on the validation cache; the test cache only scores them.
Scoring a threshold set on the test cache is exactly what the early-exit forward computes
(same gate weights on the same pooled features); ``compare.py`` checks that claim with the
real forward for one profile per model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from timm_dgate import GatedModel, calibrate, tradeoff_curve
from timm_dgate.cache import FeatureCache
from timm_dgate.calibrate import ExitTable
from timm_dgate.demo.pipeline import DROPS

# method -> (gate loss, exit score)
METHODS = {
    "hinge d-gates (paper)": ("hinge", "margin"),
    "CE gates, max-softmax (SDN)": ("ce", "softmax"),
    "CE gates, entropy (BranchyNet)": ("ce", "entropy"),
}


@dataclass
class Point:
    """One threshold set: chosen on validation, scored on test (accuracies are fractions)."""

    target: str
    thresholds: list[float]
    val_accuracy: float
    val_gflops: float
    accuracy: float
    gflops: float
    exit_fractions: list[float]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["thresholds"] = [str(t) if t in (float("inf"), float("-inf")) else t for t in self.thresholds]
        return data


def fixed_points(model: GatedModel, score: str, val: FeatureCache, test: FeatureCache) -> list[Point]:
    """Profiles at every target of ``DROPS`` (drops from the plain model's validation accuracy)."""
    test_table = ExitTable.from_cache(model, test, score)
    points = []
    for label, drop in DROPS.items():
        profile = calibrate(model, val, max_drop=drop, exit_score=score, name=f"{score} {label}", activate=False)
        accuracy, gflops, fractions = test_table.evaluate(profile.thresholds)
        points.append(
            Point(
                label, list(profile.thresholds), profile.val_accuracy, profile.val_gflops,
                accuracy, gflops, fractions.tolist(),
            )
        )
    return points


def curve(model: GatedModel, score: str, val: FeatureCache, test: FeatureCache) -> list[tuple[float, float]]:
    """(test accuracy, test GFLOPs) along the trade-off front found on validation, cheapest first."""
    val_table = ExitTable.from_cache(model, val, score)
    test_table = ExitTable.from_cache(model, test, score)
    return [test_table.evaluate(t)[:2] for t in tradeoff_curve(val_table)]
