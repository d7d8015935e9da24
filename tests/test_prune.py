"""Closed gates cost nothing, calibration may close any gate, and ``prune()`` drops the closed ones.

Many candidate gates are only cheap to fit if the ones calibration does not keep cost nothing
afterwards: not called at run time, not counted in FLOPs, and gone from a saved model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import timm_dgate
from timm_dgate.calibration.goals import Target
from timm_dgate.calibration.search import search_thresholds
from timm_dgate.core.costs import GateCosts
from timm_dgate.core.exit_table import ExitTable
from timm_dgate.core.profiles import Profile

from .helpers import SIZE, tiny_gated


def spread_thresholds(gated, x):
    """A threshold per gate at the median exit score, so that each open gate lets some samples leave."""
    margins, _ = gated.forward_gates(x)
    return [timm_dgate.core.scores.exit_score(m, gated.exit_score).median().item() for m in margins]


@pytest.fixture
def gated_and_batch():
    gated = tiny_gated()
    for gate in gated.gates:
        torch.nn.init.normal_(gate.fc.weight, std=1.0)
    x = torch.randn(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return gated, x


@torch.no_grad()
def test_a_closed_gate_is_never_called(gated_and_batch):
    gated, x = gated_and_batch
    calls = [0] * gated.num_gates
    for k, gate in enumerate(gated.gates):
        gate.register_forward_hook(lambda m, a, out, k=k: calls.__setitem__(k, calls[k] + 1))
    thresholds = spread_thresholds(gated, x)
    thresholds[1] = math.inf
    gated.set_thresholds(thresholds)
    gated(x)
    assert calls[1] == 0 and calls[0] == 1


def test_a_closed_gate_costs_nothing():
    costs = GateCosts(to_gate=(1e8, 2e8, 3e8), gate=(2e5, 4e5, 8e5), backbone=4e8)
    exits = torch.tensor([0, 2, 3, 3])
    with_middle = costs.average(exits, (0.0, 0.0, 0.0))
    without_middle = costs.average(exits, (0.0, math.inf, 0.0))
    assert with_middle - without_middle == pytest.approx(3 / 4 * 4e5)  # the 3 samples that passed gate 1


def test_the_threshold_search_closes_a_gate_that_does_not_pay():
    """Gate 1 is always wrong: any sample leaving there costs accuracy, so the search closes it."""
    g = torch.Generator().manual_seed(0)
    n = 400
    scores = torch.randn(3, n, generator=g, dtype=torch.float64)
    correct = torch.stack([scores[0] > 0, torch.zeros(n, dtype=torch.bool), scores[2] > -1, torch.ones(n, dtype=bool)])
    table = ExitTable(scores, correct, GateCosts(to_gate=(1e8, 2e8, 3e8), gate=(2e5, 4e5, 8e5), backbone=4e8))
    for method in ("sequential", "coordinate"):
        thresholds = search_thresholds(table, Target(max_drop=0.0), method)
        assert thresholds[1] == math.inf and thresholds[0] != math.inf


@torch.no_grad()
def test_prune_drops_closed_gates_and_keeps_the_outputs(gated_and_batch, tmp_path):
    gated, x = gated_and_batch
    thresholds = spread_thresholds(gated, x)
    gated.add_profile(Profile("early", (thresholds[0], math.inf, math.inf)))
    gated.set_thresholds((math.inf, math.inf, thresholds[2]))
    before = gated(x, return_exits=True)
    full_gflops = sum(gated.costs.gate)
    assert gated.prune() == ["layer2"]
    assert [b.name for b in gated.boundaries] == ["layer1", "layer3"] and gated.num_gates == 2
    after = gated(x, return_exits=True)
    assert torch.equal(after.logits, before.logits)
    assert torch.equal(after.exits, torch.where(before.exits == 2, 1, torch.where(before.exits == 3, 2, before.exits)))
    assert sum(gated.costs.gate) < full_gflops
    assert gated.profiles["early"].thresholds == (thresholds[0], math.inf)

    folder = gated.save_pretrained(tmp_path / "pruned")
    config = json.loads((folder / "dgate_config.json").read_text())
    assert [g["module"] for g in config["gates"]] == ["layer1", "layer3"] and config["pruned_gates"] == ["layer2"]
    loaded = timm_dgate.from_pretrained(folder)
    assert [b.name for b in loaded.boundaries] == ["layer1", "layer3"]
    assert torch.equal(loaded(x), after.logits)
    loaded.use_profile("early")
    assert loaded.thresholds == (thresholds[0], math.inf)


def test_profiles_from_before_pruning_load_unless_they_open_a_dropped_gate(gated_and_batch):
    gated, x = gated_and_batch
    thresholds = spread_thresholds(gated, x)
    gated.set_thresholds((thresholds[0], math.inf, thresholds[2]))
    gated.prune()
    gated.add_profile(Profile("old", (thresholds[0], math.inf, math.inf)))
    assert gated.profiles["old"].thresholds == (thresholds[0], math.inf)
    with pytest.raises(ValueError, match=r"opens the gate\(s\) at layer2, which prune\(\) removed"):
        gated.add_profile(Profile("middle", (math.inf, thresholds[1], math.inf)))


def test_prune_refuses_to_leave_no_gate():
    gated = tiny_gated()
    with pytest.raises(ValueError, match="every gate is closed"):
        gated.prune()
    assert gated.num_gates == 3
