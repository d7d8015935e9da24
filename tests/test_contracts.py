"""Correctness contracts of the early-exit executor, across many timm families.

With every gate closed the wrapped model is the plain model; with forced exits the samples
that go on get exactly the plain model's logits and the exited ones their gate's margins.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import timm
import torch

import timm_dgate
from timm_dgate.boundaries.discovery import candidate_boundaries
from timm_dgate.boundaries.locate import locate_missing
from timm_dgate.boundaries.probe import probe_boundaries
from timm_dgate.core.engine import select_part
from timm_dgate.core.scores import exit_score

from .families import COVERS, FAMILIES

BATCH = 6
KINDS = {
    "NCHW", "NHWC", "tokens with prefix tokens", "tokens without prefix tokens", "tuple", "list", "realigned shortcut"
}


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=FAMILIES, ids=[f[0] for f in FAMILIES])
def family(request):
    name, overrides, size = request.param
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7, **overrides).eval()
    gated = timm_dgate.wrap(model, input_size=(3, size, size)).eval()
    for gate in gated.gates:  # random gates with spread-out margins
        torch.nn.init.normal_(gate.fc.weight, std=1.0)
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(x)
    return gated, x, plain, last_stage(model, x)


def last_stage(model, x):
    """The backbone's last boundary (never gated by default), found and probed as wrap would."""
    located = locate_missing(model, candidate_boundaries(model), x[:3], x.shape[1:])
    return probe_boundaries(model, located[-1:], x.shape[1:])[0]


def test_family_matrix_covers_40_timm_families_and_every_kind_of_stage_output():
    modules = {timm.models.model_entrypoint(name).__module__ for name, _, _ in FAMILIES}
    assert len(modules) >= 40, sorted(modules)
    assert set(COVERS.values()) == KINDS
    assert set(COVERS) <= {name for name, _, _ in FAMILIES}


def kinds_of(gated, x) -> set[str]:
    """What the gated boundaries of a model are: layouts, tuple or list outputs, realigned shortcuts."""
    prefix = int(getattr(gated.base_model, "num_prefix_tokens", 0) or 0)
    tokens = "tokens with prefix tokens" if prefix else "tokens without prefix tokens"
    found = {tokens if b.layout == "NLC" else b.layout for b in gated.boundaries}
    found |= {"realigned shortcut" for b in gated.boundaries if b.realign}
    outputs: list[object] = []
    handles = [gated.base_model.get_submodule(b.module).register_forward_hook(lambda m, a, out: outputs.append(out))
               for b in gated.boundaries]
    try:
        with torch.no_grad():
            gated.base_model(x)
    finally:
        for h in handles:
            h.remove()
    return found | {type(out).__name__ for out in outputs if isinstance(out, (tuple, list))}


def test_family_stage_outputs_are_of_a_known_kind_and_the_one_it_stands_for(family, request):
    """Every gated boundary hands on something the engine knows how to cut; a family in ``COVERS`` has its kind."""
    gated, x, _, _ = family
    found = kinds_of(gated, x)
    assert found and found <= KINDS, found
    name = request.node.callspec.id
    assert name not in COVERS or COVERS[name] in found


@torch.no_grad()
def test_closed_gates_give_plain_logits(family):
    gated, x, plain, _ = family
    assert all(t == math.inf for t in gated.thresholds)
    assert close(gated(x), plain)
    result = gated(x, return_exits=True)  # through the hook engine, not the shortcut
    assert close(result.logits, plain)
    assert (result.exits == gated.num_gates).all()


def _thresholds_for_spread_exits(gated, x):
    """Per gate, a threshold midway between two scores so that about 1/(K+1) of the batch leaves."""
    margins, _ = gated.forward_gates(x)
    scores = [exit_score(m, gated.exit_score) for m in margins]
    alive = torch.ones(x.shape[0], dtype=torch.bool)
    thresholds, exits = [], torch.full((x.shape[0],), gated.num_gates)
    for k, s in enumerate(scores):
        ranked = s[alive].sort(descending=True).values
        take = max(1, len(ranked) // (gated.num_gates + 1 - k))
        t = float((ranked[take - 1] + ranked[take]) / 2) if take < len(ranked) else float(ranked[-1]) - 1
        leave = alive & (s >= t)
        exits[leave] = k
        alive &= ~leave
        thresholds.append(t)
    return thresholds, exits, margins


@contextmanager
def thresholds_in_force(gated, thresholds):
    """Open the gates for one test; the session-scoped model goes back to all gates closed."""
    gated.set_thresholds(thresholds)
    try:
        yield
    finally:
        gated.close_gates()


@torch.no_grad()
def test_forced_exits_are_exact(family):
    gated, x, plain, _ = family
    thresholds, expected_exits, margins = _thresholds_for_spread_exits(gated, x)
    with thresholds_in_force(gated, thresholds):
        result = gated(x, return_exits=True)
    assert torch.equal(result.exits, expected_exits)
    assert (expected_exits < gated.num_gates).any() and (expected_exits == gated.num_gates).any()
    for i, k in enumerate(expected_exits.tolist()):
        expected = plain[i] if k == gated.num_gates else margins[k][i]
        assert close(result.logits[i], expected), f"sample {i} exited at {k}"


@torch.no_grad()
def test_shuffling_the_batch_permutes_the_outputs(family):
    gated, x, _, _ = family
    thresholds, _, _ = _thresholds_for_spread_exits(gated, x)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))
    with thresholds_in_force(gated, thresholds):
        base, shuffled = gated(x, return_exits=True), gated(x[perm], return_exits=True)
    assert torch.equal(shuffled.exits, base.exits[perm])
    assert close(shuffled.logits, base.logits[perm])


@torch.no_grad()
def test_later_stages_compute_only_the_samples_still_in_the_batch(family):
    """Exited samples are removed, not masked: each later stage's output has one row per survivor."""
    gated, x, _, last = family
    thresholds, exits, _ = _thresholds_for_spread_exits(gated, x)
    expected = {b.module: int((exits >= k).sum()) for k, b in enumerate(gated.boundaries)}
    expected[last.module] = int((exits == gated.num_gates).sum())
    parts = {b.module: b.part for b in (*gated.boundaries, last)}
    seen: dict[str, list[int]] = {name: [] for name in expected}
    handles = [  # prepend: see each output before the engine's own hook takes samples out of it
        gated.base_model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: seen[name].append(select_part(out, parts[name]).shape[0]), prepend=True
        )
        for name in expected
    ]
    try:
        with thresholds_in_force(gated, thresholds):
            gated(x)
    finally:
        for h in handles:
            h.remove()
    assert expected[last.module] < BATCH
    assert seen == {name: [rows] for name, rows in expected.items()}


@torch.no_grad()
def test_all_exit_at_first_gate_skips_later_stages(family):
    gated, x, _, last = family
    calls = []
    later_modules = [b.module for b in gated.boundaries[1:]] + [last.module]
    later = [gated.base_model.get_submodule(m) for m in later_modules]
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in later]
    gated.set_thresholds([-math.inf] + [math.inf] * (gated.num_gates - 1))
    try:
        result = gated(x, return_exits=True)
    finally:
        gated.close_gates()
        for h in handles:
            h.remove()
    assert (result.exits == 0).all()
    assert calls == []
