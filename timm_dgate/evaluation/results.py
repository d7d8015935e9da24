"""What ``evaluate`` and ``throughput`` measure, and the markdown tables that print it.

The records and their tables live together because a report prints itself
(:meth:`EvalReport.table`); ``evaluate`` and ``bench`` only measure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class ProfileResult:
    """One profile's numbers on the evaluation split.

    ``exits_per_class[k][c]`` counts the images of class ``c`` leaving at exit ``k`` (rows: gates
    then head); ``correct_per_class[k][c]`` counts those of them classified right.
    """

    name: str
    thresholds: tuple[float, ...]
    accuracy: float
    gflops: float
    flops_reduction: float
    ms_per_image: float
    plain_ms_per_image: float
    exit_fractions: list[float]
    exits_per_class: list[list[int]] = field(default_factory=list)
    correct_per_class: list[list[int]] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.plain_ms_per_image / self.ms_per_image


@dataclass
class EvalReport:
    """The plain model's accuracy and cost, and every profile's results, on one split."""

    split: str
    num_images: int
    plain_accuracy: float
    plain_gflops: float
    profiles: list[ProfileResult]

    def table(self) -> str:
        """The paper-style markdown table (see :func:`evaluation_table`)."""
        return evaluation_table(self)


@dataclass
class Throughput:
    batch_size: int
    profile: str
    images_per_s: float
    plain_images_per_s: float

    @property
    def speedup(self) -> float:
        return self.images_per_s / self.plain_images_per_s


def _thresholds(values: Sequence[float]) -> str:
    return ", ".join("closed" if t == math.inf else f"{t:.3g}" for t in values)


def evaluation_table(report: EvalReport) -> str:
    """A markdown table in the shape of the paper's Table 1."""
    lines = [
        f"| profile | thresholds | {report.split} accuracy | GFLOPs | FLOPs reduction | ms/image | speed-up |",
        "|---|---|---|---|---|---|---|",
        f"| plain model | - | {100 * report.plain_accuracy:.2f}% | {report.plain_gflops:.4f} | 0.0% | - | 1.00x |",
    ]
    for r in report.profiles:
        lines.append(
            f"| {r.name} | {_thresholds(r.thresholds)} | {100 * r.accuracy:.2f}% | {r.gflops:.4f} | "
            f"{100 * r.flops_reduction:.1f}% | {r.ms_per_image:.3f} (plain {r.plain_ms_per_image:.3f}) | "
            f"{r.speedup:.2f}x |"
        )
    return "\n".join(lines)


def exits_per_class_table(result: ProfileResult, class_names: Sequence[str], gate_names: Sequence[str]) -> str:
    """Markdown table: for each class, the share of its samples leaving at each gate (paper's exp. 4)."""
    rows = [*gate_names, "head"]
    lines = ["| class | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for c, cname in enumerate(class_names):
        column = [result.exits_per_class[k][c] for k in range(len(rows))]
        n = max(1, sum(column))
        lines.append(f"| {cname} | " + " | ".join(f"{100 * v / n:.0f}%" for v in column) + " |")
    return "\n".join(lines)


def throughput_table(rows: Sequence[Throughput]) -> str:
    lines = ["| batch size | profile | images/s | plain images/s | speed-up |", "|---|---|---|---|---|"]
    lines += [
        f"| {r.batch_size} | {r.profile} | {r.images_per_s:.1f} | {r.plain_images_per_s:.1f} | {r.speedup:.2f}x |"
        for r in rows
    ]
    return "\n".join(lines)
