"""``evaluate`` reports what the gated model really does: each profile's numbers against a hand loop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import timm_dgate
from timm_dgate.core.profiles import Profile
from timm_dgate.core.scores import exit_score

from .helpers import batches, trained_gated


@dataclass(frozen=True)
class Measured:
    accuracy: float
    gflops: float
    exit_fractions: list[float]
    exits_per_class: list[list[int]]  # [exit][class]: images
    correct_per_class: list[list[int]]  # [exit][class]: of them classified right


@torch.no_grad()
def by_hand(gated: timm_dgate.GatedModel, data: list[tuple[torch.Tensor, torch.Tensor]]) -> Measured:
    """Run ``model(x, return_exits=True)`` and price each sample's exit from ``costs`` field by field."""
    costs, k = gated.costs, gated.num_gates
    open_gates = [t != math.inf for t in gated.thresholds]
    hits, flops, exits = 0, 0.0, []
    counts = [[0] * gated.num_classes for _ in range(k + 1)]
    right = [[0] * gated.num_classes for _ in range(k + 1)]
    for x, y in data:
        out = gated(x, return_exits=True)
        hits += (out.logits.argmax(1) == y).sum().item()
        for e, label, guess in zip(out.exits.tolist(), y.tolist(), out.logits.argmax(1).tolist()):
            counts[e][label] += 1
            right[e][label] += guess == label
        for e in out.exits.tolist():
            reached = costs.to_gate[e] if e < k else costs.backbone
            flops += reached + sum(c for c, o in zip(costs.gate[: e + 1], open_gates) if o)
        exits.append(out.exits)
    n = sum(len(y) for _, y in data)
    fractions = (torch.bincount(torch.cat(exits), minlength=k + 1).double() / n).tolist()
    return Measured(hits / n, flops / n / 1e9, fractions, counts, right)


def test_evaluate_reports_each_profiles_accuracy_gflops_and_exits_as_the_real_forward_gives_them(
    fmnist, trained_backbone
):
    gated = trained_gated(trained_backbone)
    timm_dgate.fit(gated, batches(fmnist.train), epochs=30, progress=False)
    with torch.no_grad():
        margins, _ = gated.forward_gates(batches(fmnist.val)[0][0])
    scores = [exit_score(m, gated.exit_score) for m in margins]
    # every gate open, and only the first open (closed gates must cost nothing)
    gated.add_profile(Profile("spread", tuple(s.quantile(0.7).item() for s in scores)))
    gated.add_profile(Profile("first", (scores[0].quantile(0.5).item(), math.inf, math.inf)))
    test = batches(fmnist.test)[:2]  # 500 images
    n = sum(len(y) for _, y in test)
    report = timm_dgate.evaluate(gated, test, timing_images=32, repeats=1, progress=False)

    with torch.no_grad():
        plain = sum((gated.base_model(x).argmax(1) == y).sum().item() for x, y in test) / n
    assert report.plain_accuracy == plain and report.num_images == n
    assert [r.name for r in report.profiles] == ["spread", "first"]
    for result in report.profiles:
        gated.use_profile(result.name)
        want = by_hand(gated, test)
        assert result.accuracy == want.accuracy, result.name
        assert result.gflops == pytest.approx(want.gflops, rel=1e-9), result.name
        assert result.flops_reduction == pytest.approx(1 - want.gflops * 1e9 / gated.costs.backbone, rel=1e-9)
        assert result.exit_fractions == pytest.approx(want.exit_fractions, abs=1e-12), result.name
        assert result.exits_per_class == want.exits_per_class, result.name
        assert result.correct_per_class == want.correct_per_class, result.name
        assert want.accuracy != plain and min(want.exit_fractions[0], want.exit_fractions[-1]) > 0
