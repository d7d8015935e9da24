"""What a threshold search must meet (:class:`Target`) and what it minimises (:class:`Goal`) on an exit table.

Both searches (``search``) and Learn then Test (``learn_then_test``) rank threshold sets by the
same goal, so a target means the same thing whichever of them chose the thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from ..core.exit_table import ExitTable
from ..errors import CalibrationError


@dataclass(frozen=True)
class Target:
    """What a profile must meet: an absolute accuracy, a drop from the plain model, or a FLOPs budget.

    ``confidence``: the probability with which an accuracy target must hold on new data.
    """

    min_accuracy: float | None = None
    max_drop: float | None = None
    max_gflops: float | None = None
    confidence: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.min_accuracy, self.max_drop, self.max_gflops) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one target: min_accuracy, max_drop or max_gflops")
        for name in ("max_drop", "min_accuracy"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(
                    f"{name} is a fraction in [0, 1), got {value}: 0.005 is half a point, 0.9 is 90%"
                )
        if self.max_gflops is not None and not self.max_gflops > 0:
            raise ValueError(f"max_gflops must be positive, got {self.max_gflops}")
        if self.confidence is not None:
            if self.max_gflops is not None:
                raise ValueError("confidence applies to accuracy targets (max_drop, min_accuracy), not max_gflops")
            if not 0.5 <= self.confidence < 1:
                raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")

    @property
    def z(self) -> float:
        """Standard errors the accuracy estimate must clear the target by (0 without ``confidence``)."""
        return NormalDist().inv_cdf(self.confidence) if self.confidence else 0.0

    def describe(self) -> str:
        sure = f" with {100 * self.confidence:g}% confidence" if self.confidence else ""
        if self.max_drop is not None:
            return f"accuracy >= plain - {100 * self.max_drop:.2f} pt{sure}"
        if self.min_accuracy is not None:
            return f"accuracy >= {100 * self.min_accuracy:.2f}%{sure}"
        return f"<= {self.max_gflops:g} GFLOPs"


@dataclass(frozen=True)
class Goal:
    """What a search minimises: ``kind`` is ``correct`` (a floor on correct answers), ``flops``
    (a ceiling on total FLOPs) or ``price`` (the trade-off ``flops - bound * correct``).

    With ``z > 0`` a ``correct`` floor must be cleared by the lower confidence bound
    ``correct - z * sqrt(changed - (correct - reference)^2 / n)``: ``changed`` counts samples
    whose correctness differs from the reference's (the plain model's for a drop target,
    always-wrong for an absolute one), which makes that the paired standard error times n.
    """

    kind: str
    bound: float
    changed: torch.Tensor  # (K + 1, N): correctness at that exit differs from the reference
    z: float = 0.0
    reference: float = 0.0  # correct answers of the reference

    def assured(self, correct: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        """Correct answers the target counts: the lower confidence bound with ``z``, else the count itself."""
        if not self.z:
            return correct
        n = self.changed.shape[1]
        spread = (changed - (correct - self.reference).square() / n).clamp_min(0).sqrt()
        return correct - self.z * spread

    def shortfall(self, correct: torch.Tensor, changed: torch.Tensor, flops: torch.Tensor) -> torch.Tensor:
        """How far the target is missed (0 where it is met): correct answers short, or FLOPs over."""
        if self.kind == "correct":
            return (self.bound - self.assured(correct, changed)).clamp_min(0)
        if self.kind == "flops":
            return (flops - self.bound).clamp_min(0)
        return torch.zeros_like(flops)

    def rank(self, correct: torch.Tensor, changed: torch.Tensor, flops: torch.Tensor) -> torch.Tensor:
        """Lexicographic key (violation, objective) folded into one float64: lower is better."""
        if self.kind == "price":
            return flops - self.bound * correct
        if self.kind == "correct":
            return self.shortfall(correct, changed, flops) * 1e30 + flops
        return self.shortfall(correct, changed, flops) * 1e6 - correct


def goal_of(table: ExitTable, target: Target) -> Goal:
    """The goal that meets ``target`` on ``table``'s samples (an accuracy floor in correct answers, or FLOPs)."""
    n = table.scores.shape[1]
    if target.max_gflops is not None:
        return Goal("flops", target.max_gflops * 1e9 * n, table.correct)
    if target.max_drop is not None:
        reference = table.correct[-1]
        needed = table.plain_accuracy - target.max_drop
    else:
        reference = torch.zeros_like(table.correct[-1])
        needed = target.min_accuracy
    changed = table.correct != reference
    return Goal("correct", math.ceil(needed * n - 1e-9), changed, target.z, reference.double().sum().item())


def totals(table: ExitTable, thresholds: list[float] | tuple[float, ...], goal: Goal) -> tuple[torch.Tensor, ...]:
    """Correct answers, changed answers and FLOPs summed over the samples, each as a 1-element tensor."""
    exits = table.exits(tuple(thresholds)).unsqueeze(0)
    correct = table.correct.gather(0, exits).double().sum()
    changed = goal.changed.gather(0, exits).double().sum()
    flops = table.costs.exit_costs([t != math.inf for t in thresholds])[exits].sum()
    return correct.reshape(1), changed.reshape(1), flops.reshape(1)


def rank_of(table: ExitTable, thresholds: list[float], goal: Goal) -> float:
    return goal.rank(*totals(table, thresholds, goal)).item()


def check_met(table: ExitTable, thresholds: tuple[float, ...], goal: Goal, target: Target) -> None:
    """Raise :class:`CalibrationError` naming the best reachable value when ``thresholds`` miss the target."""
    correct, changed, flops = totals(table, thresholds, goal)
    if goal.shortfall(correct, changed, flops).item() <= 1e-9:
        return
    n = table.scores.shape[1]
    if goal.kind == "flops":
        best = f"the cheapest reachable is {flops.item() / n / 1e9:.4g} GFLOPs per image"
    else:
        bound = " (lower confidence bound)" if goal.z else ""
        best = f"the best reachable accuracy{bound} is {goal.assured(correct, changed).item() / n:.4f}"
    raise CalibrationError(
        f"cannot meet {target.describe()} on this validation data ({n} images): {best}; "
        f"the plain model's is {table.plain_accuracy:.4f}. Nothing was activated."
    )
