"""Threshold profiles: a named set of gate thresholds and what it was measured at.

JSON has no infinity, so a closed gate's threshold (``inf``) is written as the string ``"inf"``
everywhere timm_dgate writes thresholds (profiles, the config, benchmark results).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .scores import check_exit_score


def encode_thresholds(values: Iterable[float]) -> list[float | str]:
    """JSON-ready thresholds: ``±inf`` become the strings ``"inf"`` / ``"-inf"``."""
    return [str(v) if math.isinf(v) else v for v in values]


def decode_thresholds(values: Sequence[float | str], num_gates: int | None = None) -> tuple[float, ...]:
    """Thresholds read back: numbers or ``"inf"``/``"-inf"``; NaN and a wrong count are refused."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"thresholds must be a list, got {values!r}")
    thresholds = tuple(float(v) for v in values)
    if any(math.isnan(t) for t in thresholds):
        raise ValueError(f"thresholds must not be NaN: {list(values)}")
    if num_gates is not None and len(thresholds) != num_gates:
        raise ValueError(f"{len(thresholds)} thresholds for {num_gates} gates")
    return thresholds


@dataclass
class Profile:
    """Thresholds for every gate (``inf`` closes one) plus the numbers they were chosen for.

    ``val_*`` fields come from the calibration split; ``test`` holds metrics from a split
    that chose nothing, filled in by evaluation when asked.
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
        self.thresholds = decode_thresholds(self.thresholds)
        self.exit_fractions = tuple(float(f) for f in self.exit_fractions)

    def opened(self) -> list[int]:
        """Indices of the gates this profile opens (a finite threshold)."""
        return [k for k, t in enumerate(self.thresholds) if t != math.inf]

    def keep_gates(self, keep: Sequence[int]) -> Profile:
        """This profile on a model that kept only the gates ``keep`` (the others closed here)."""
        closed = set(range(len(self.thresholds))) - set(keep)
        if any(self.thresholds[k] != math.inf for k in closed):
            raise ValueError(f"profile {self.name!r} opens a gate that would be dropped")
        fractions = self.exit_fractions
        if len(fractions) == len(self.thresholds) + 1:
            fractions = tuple(fractions[k] for k in keep) + fractions[-1:]
        return replace(self, thresholds=tuple(self.thresholds[k] for k in keep), exit_fractions=fractions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: infinite thresholds become the string ``"inf"``."""
        data = asdict(self)
        data["thresholds"] = encode_thresholds(self.thresholds)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], num_gates: int | None = None) -> Profile:
        """Read a profile back; unknown fields are ignored (files from newer versions still load)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["thresholds"] = decode_thresholds(data["thresholds"], num_gates)
        return cls(**values)


def check_profile_name(name: str, known: Collection[str], where: str) -> str:
    """``name`` if it is among the ``known`` profiles, else a ``KeyError`` that lists them."""
    if name not in known:
        raise KeyError(f"unknown profile {name!r} in {where}; it has: {', '.join(known) or 'none'}")
    return name
