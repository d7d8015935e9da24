"""Evaluate threshold profiles on a held-out split: accuracy, FLOPs, wall-clock, exits.

Accuracy and exits come from the real early-exit forward (not a simulation), FLOPs from
each sample's exit position, and wall-clock from the gated and the plain model timed side
by side on the same preloaded batches, alternating, so machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .model import GatedModel


@dataclass
class ProfileResult:
    """One profile's numbers on the evaluation split (``exits_per_class``: rows gates then head)."""

    name: str
    thresholds: tuple[float, ...]
    accuracy: float
    gflops: float
    flops_reduction: float
    ms_per_image: float
    plain_ms_per_image: float
    exit_fractions: list[float]
    exits_per_class: list[list[int]] = field(default_factory=list)

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
        """The paper-style markdown table (see :func:`format_table`)."""
        return format_table(self)


def _batches(data: Iterable, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in data:
        yield images.to(device), labels.to(device)


def _timing_batches(data: Iterable, device: torch.device, images: int) -> list[torch.Tensor]:
    taken, out = 0, []
    for x, _ in _batches(data, device):
        out.append(x)
        taken += len(x)
        if taken >= images:
            break
    return out


def time_side_by_side(run_a, run_b, batches: Sequence[torch.Tensor], repeats: int) -> tuple[float, float]:
    """Median seconds per image of two callables, measured alternately on the same batches."""
    images = sum(len(b) for b in batches)
    times: tuple[list[float], list[float]] = ([], [])
    run_a(batches[0])
    run_b(batches[0])  # warm-up
    for _ in range(repeats):
        for run, out in ((run_a, times[0]), (run_b, times[1])):
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            if batches[0].is_cuda:
                torch.cuda.synchronize()
            out.append((time.perf_counter() - start) / images)
    return statistics.median(times[0]), statistics.median(times[1])


@torch.inference_mode()
def evaluate(
    model: GatedModel,
    data: Iterable,
    profiles: Sequence[str] | None = None,
    *,
    split: str = "test",
    timing_images: int = 2048,
    repeats: int = 3,
    progress: bool = True,
) -> EvalReport:
    """Run every profile (default: all stored) over ``data`` and time it against the plain model.

    ``data`` yields ``(images, labels)`` batches and is iterated once per profile plus once
    for the plain model; its first ``timing_images`` images are preloaded for timing. Each
    profile's test metrics are also stored in ``profile.test``.
    """
    names = list(profiles if profiles is not None else model.profiles)
    device = next(model.parameters()).device
    model.eval()
    active = model.active_profile
    plain = model.base_model
    num_classes, head = model.num_classes, model.num_gates
    correct = total = 0
    for x, y in tqdm(_batches(data, device), desc="plain model", disable=not progress, leave=False):
        correct += (plain(x).argmax(1) == y).sum().item()
        total += len(y)
    timing = _timing_batches(data, device, timing_images)
    results = []
    for name in tqdm(names, desc=f"profiles on {split}", disable=not progress, leave=False):
        profile = model.use_profile(name)
        hits, counts, flops = 0, torch.zeros(head + 1, num_classes, dtype=torch.long), 0.0
        for x, y in _batches(data, device):
            out = model(x, return_exits=True)
            hits += (out.logits.argmax(1) == y).sum().item()
            counts += torch.bincount(
                (out.exits * num_classes + y).cpu(), minlength=(head + 1) * num_classes
            ).view(head + 1, num_classes)
            flops += model.costs.average(out.exits, model.thresholds) * len(y)
        gated_s, plain_s = time_side_by_side(model, plain, timing, repeats)
        result = ProfileResult(
            name=name,
            thresholds=profile.thresholds,
            accuracy=hits / total,
            gflops=flops / total / 1e9,
            flops_reduction=1 - flops / total / model.costs.backbone,
            ms_per_image=gated_s * 1e3,
            plain_ms_per_image=plain_s * 1e3,
            exit_fractions=(counts.sum(1).double() / total).tolist(),
            exits_per_class=counts.tolist(),
        )
        profile.test = {
            "split": split,
            "accuracy": result.accuracy,
            "gflops": result.gflops,
            "flops_reduction": result.flops_reduction,
            "speedup": result.speedup,
            "plain_accuracy": correct / total,
        }
        results.append(result)
    if active is not None:
        model.use_profile(active)
    return EvalReport(split, total, correct / total, model.costs.backbone / 1e9, results)


def format_table(report: EvalReport) -> str:
    """A markdown table in the shape of the paper's Table 1."""
    lines = [
        f"| profile | thresholds | {report.split} accuracy | GFLOPs | FLOPs reduction | ms/image | speed-up |",
        "|---|---|---|---|---|---|---|",
        f"| plain model | - | {100 * report.plain_accuracy:.2f}% | {report.plain_gflops:.4f} | 0.0% | - | 1.00x |",
    ]
    for r in report.profiles:
        thresholds = ", ".join("closed" if t == float("inf") else f"{t:.3g}" for t in r.thresholds)
        lines.append(
            f"| {r.name} | {thresholds} | {100 * r.accuracy:.2f}% | {r.gflops:.4f} | "
            f"{100 * r.flops_reduction:.1f}% | {r.ms_per_image:.3f} (plain {r.plain_ms_per_image:.3f}) | "
            f"{r.speedup:.2f}x |"
        )
    return "\n".join(lines)


def format_exits_per_class(result: ProfileResult, class_names: Sequence[str], gate_names: Sequence[str]) -> str:
    """Markdown table: for each class, the share of its samples leaving at each gate (paper's exp. 4)."""
    rows = [*gate_names, "head"]
    lines = ["| class | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for c, cname in enumerate(class_names):
        column = [result.exits_per_class[k][c] for k in range(len(rows))]
        n = max(1, sum(column))
        lines.append(f"| {cname} | " + " | ".join(f"{100 * v / n:.0f}%" for v in column) + " |")
    return "\n".join(lines)
