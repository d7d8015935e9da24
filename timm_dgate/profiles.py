"""Threshold profiles: a named set of gate thresholds and what it was measured at."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .scores import check_exit_score


@dataclass
class Profile:
    """Thresholds for every gate (``inf`` closes one) plus the numbers they were chosen for.

    ``val_*`` fields come from the calibration split; ``test`` holds metrics from a split
    that chose nothing, filled in by evaluation.
    """

    name: str
    thresholds: tuple[float, ...]
    exit_score: str = "margin"
    target: str = ""
    split: str = "validation"
    val_accuracy: float | None = None
    val_gflops: float | None = None
    val_plain_accuracy: float | None = None
    exit_fractions: tuple[float, ...] = ()
    test: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_exit_score(self.exit_score)
        self.thresholds = tuple(float(t) for t in self.thresholds)
        self.exit_fractions = tuple(float(f) for f in self.exit_fractions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: infinite thresholds become the string ``"inf"``."""
        data = asdict(self)
        data["thresholds"] = [_encode(t) for t in self.thresholds]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        data = dict(data)
        data["thresholds"] = tuple(float(t) for t in data["thresholds"])
        return cls(**data)


def _encode(value: float) -> float | str:
    return str(value) if math.isinf(value) else value
