"""Families gated through a forward adapter (``timm_dgate.boundaries.adapters``): CoaT, Twins, DeepSeek and
Qwen3 ViT keep ``B = x.shape[0]`` from before their first stage, so the exit engine runs a rewrite of their
forward. The rewrite must be the model's forward exactly, with gates closed, with samples exiting at every
gate, and with no hooks at all.
"""

from __future__ import annotations

import pytest
import timm
import torch

import timm_dgate
from timm_dgate.boundaries import adapters, discovery
from timm_dgate.boundaries.discovery import candidate_boundaries, family_forward

from .test_contracts import _thresholds_for_spread_exits, close, thresholds_in_force

BATCH = 6
TINY_VIT = {"depth": 4, "embed_dim": 64, "num_heads": 2}
TINY_COAT = {"embed_dims": [32, 32, 32, 32], "serial_depths": [1, 1, 1, 1]}  # 8 heads: its position conv splits 2/3/3
# (timm model name, create_model overrides that shrink it, input size): every classifier code path of each family
GATED = [
    ("coat_lite_tiny", {"img_size": 64, **TINY_COAT}, 64),  # serial stages only
    ("coat_tiny", {"img_size": 64, "parallel_depth": 1, **TINY_COAT}, 64),  # serial stages, then parallel blocks
    ("twins_svt_small", {"img_size": 64, "depths": (1, 1, 1, 1)}, 64),  # each stage ends in its position block
    ("twins_pcpvt_small", {"img_size": 64, "depths": (1, 2, 1, 1)}, 64),  # the second stage in a block after it
    ("deepseek_vit_412m", {"img_size": 56, **TINY_VIT}, 56),
    ("deepseek_vit_412m_align", {"img_size": 84, "out_features": 32, **TINY_VIT}, 84),  # the aligner projector
    ("qwen3_vit_88m", {"img_size": 64, **TINY_VIT}, 64),
    ("qwen3_vit_88m_merge", {"img_size": 64, "out_features": 32, **TINY_VIT}, 64),  # the patch merger
]
ADAPTERS = {
    "coat": adapters.coat_forward,
    "twins": adapters.twins_forward,
    "deepseek_vit": adapters.deepseek_vit_forward,
    "qwen3_vit": adapters.qwen3_vit_forward,
}
ENCODERS = [  # no classifier, so never gated, but the adapter covers their forward too
    ("deepseek_vit_412m_enc", {"img_size": 84, "out_features": 32, **TINY_VIT}, 84),
    ("qwen3_vit_88m_enc", {"img_size": 64, "out_features": 32, **TINY_VIT}, 64),
]


def create(name: str, overrides: dict, size: int, **kwargs: object) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **overrides, **kwargs).eval()
    return model, torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=GATED, ids=[g[0] for g in GATED])
def family(request):
    name, overrides, size = request.param
    model, x = create(name, overrides, size, num_classes=7)
    gated = timm_dgate.wrap(model, input_size=(3, size, size)).eval()
    for gate in gated.gates:  # random gates with spread-out margins
        torch.nn.init.normal_(gate.fc.weight, std=1.0)
    with torch.no_grad():
        plain = model(x)
    return gated, x, plain


@pytest.mark.parametrize(("name", "overrides", "size"), GATED + ENCODERS, ids=[g[0] for g in GATED + ENCODERS])
@torch.no_grad()
def test_the_adapter_is_the_models_own_forward(name, overrides, size):
    model, x = create(name, overrides, size)
    adapter = family_forward(model)
    assert adapter is ADAPTERS[timm_dgate.family_of(model)]
    assert torch.equal(adapter(model, x), model(x))


def test_overriding_a_familys_placement_keeps_its_forward(monkeypatch):
    monkeypatch.setattr(discovery, "_FAMILY_RULES", dict(discovery._FAMILY_RULES))
    model, _ = create(*GATED[2])
    timm_dgate.register_family("twins", placement=lambda boundaries: [1])
    assert family_forward(model) is adapters.twins_forward
    assert [b.default for b in candidate_boundaries(model)] == [False, True, False, False]


def test_every_boundary_passes_the_probe_and_the_default_gates_are_kept(family):
    gated, x, _ = family
    found = timm_dgate.stages(gated.base_model, x.shape[1:])
    assert [b.problem for b in found] == [None] * len(found)
    assert [b.name for b in gated.boundaries] == [b.name for b in found if b.default]


@torch.no_grad()
def test_gates_that_let_nobody_exit_give_the_plain_logits_exactly(family):
    gated, x, plain = family
    assert torch.equal(gated(x), plain)  # closed: the plain model, no engine
    _, logits = gated.forward_gates(x)  # the engine and the adapter, every gate read
    assert torch.equal(logits, plain)
    with thresholds_in_force(gated, [1e9] * gated.num_gates):  # open, but out of reach
        result = gated(x, return_exits=True)
    assert torch.equal(result.logits, plain) and (result.exits == gated.num_gates).all()


@torch.no_grad()
def test_samples_that_go_on_get_the_plain_logits_when_others_exit_at_every_gate(family):
    gated, x, plain = family
    thresholds, expected_exits, margins = _thresholds_for_spread_exits(gated, x)
    with thresholds_in_force(gated, thresholds):
        result = gated(x, return_exits=True)
    assert torch.equal(result.exits, expected_exits)
    assert set(expected_exits.tolist()) == set(range(gated.num_gates + 1))  # someone leaves at each gate
    for i, k in enumerate(expected_exits.tolist()):
        expected = plain[i] if k == gated.num_gates else margins[k][i]
        assert close(result.logits[i], expected), f"sample {i} exited at {k}"
