"""FLOPs add up: the backbone as FlopCounterMode counts it, plus each gate on its own input.

The cost model is what calibration optimises and what the README's savings are quoted in, so
it is checked against independent counts: the plain model counted on its own, each gate
counted on the stage output it sees, 2 FLOPs per multiply-add, and attention counted unfused.
"""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import timm_dgate
from timm_dgate.core.costs import count_flops, unfused_attention

SIZE = 32


@pytest.fixture(scope="module")
def gated():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    return timm_dgate.wrap(model, input_size=(3, SIZE, SIZE))


@torch.no_grad()
def stage_outputs(gated: timm_dgate.GatedModel) -> list[torch.Tensor]:
    """Each gated module's output for one zero image (what each gate is counted on)."""
    outputs: list[torch.Tensor] = []
    modules = [gated.base_model.get_submodule(b.module) for b in gated.boundaries]
    handles = [m.register_forward_hook(lambda m, a, o: outputs.append(o)) for m in modules]
    try:
        gated.base_model(torch.zeros(1, *gated.input_size))
    finally:
        for h in handles:
            h.remove()
    return outputs


def test_full_cost_is_plain_model_plus_every_gate(gated):
    costs = gated.costs
    plain = count_flops(gated.base_model, torch.zeros(1, *gated.input_size))
    gates = [count_flops(g, out) for g, out in zip(gated.gates, stage_outputs(gated))]
    assert costs.backbone == plain > 0
    assert costs.gate == tuple(gates)
    assert costs.full == plain + sum(gates)


def truncated_backbone(model: torch.nn.Module, last: str) -> torch.nn.Sequential:
    """test_resnet's stem and stages up to and including ``last``, built by hand (no hooks)."""
    names = ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return torch.nn.Sequential(*(model.get_submodule(n) for n in names[: names.index(last) + 1]))


def test_cost_up_to_each_gate_is_the_backbone_truncated_there(gated):
    """What the FLOPs reduction rests on: the cost of reaching each gate, against the backbone cut there by hand."""
    x = torch.zeros(1, *gated.input_size)
    for k, boundary in enumerate(gated.boundaries):
        upto = count_flops(truncated_backbone(gated.base_model, boundary.module), x)
        assert upto > 0
        assert gated.costs.to_gate[k] == upto, boundary.name
        by_hand = upto + sum(2 * b.num_chs * gated.num_classes for b in gated.boundaries[: k + 1])
        assert gated.costs.cumulative()[k] == by_hand


def test_a_gate_costs_two_flops_per_multiply_add(gated):
    for boundary, cost in zip(gated.boundaries, gated.costs.gate):
        assert cost == 2 * boundary.num_chs * gated.num_classes


def test_costs_grow_gate_by_gate(gated):
    costs = gated.costs
    cumulative = costs.cumulative()
    assert len(cumulative) == gated.num_gates >= 2
    assert all(a < b for a, b in itertools.pairwise(cumulative))
    exit_costs = costs.exit_costs()
    assert exit_costs.shape == (gated.num_gates + 1,)
    assert exit_costs[-1].item() == costs.full
    assert cumulative[-1] < costs.full
    for k in range(gated.num_gates):  # reaching gate k pays the backbone so far and gates 0..k
        assert exit_costs[k].item() == costs.to_gate[k] + sum(costs.gate[: k + 1])


def test_closed_gates_cost_nothing(gated):
    costs = gated.costs
    closed = costs.exit_costs([False] * gated.num_gates)
    assert closed[-1].item() == costs.backbone
    assert closed[:-1].tolist() == list(costs.to_gate)
    only_first = costs.exit_costs([True] + [False] * (gated.num_gates - 1))
    assert only_first[-1].item() == costs.backbone + costs.gate[0]
    assert only_first[1:-1].tolist() == [t + costs.gate[0] for t in costs.to_gate[1:]]


def test_average_is_the_mean_cost_of_each_sample_exit(gated):
    costs, k = gated.costs, gated.num_gates
    exits = torch.tensor([0, 0, 1, k, k, k])
    thresholds = [0.5, 1.0] + [math.inf] * (k - 2)
    g0, g1 = costs.gate[0], costs.gate[1]
    by_hand = (
        2 * (costs.to_gate[0] + g0) + (costs.to_gate[1] + g0 + g1) + 3 * (costs.backbone + g0 + g1)
    ) / 6
    assert costs.average(exits, thresholds) == pytest.approx(by_hand, rel=1e-12)
    all_closed = costs.average(torch.full((4,), k), [math.inf] * k)
    assert all_closed == costs.backbone
    assert costs.average(exits) == pytest.approx(costs.exit_costs()[exits].mean().item(), rel=1e-12)


@pytest.fixture
def global_fused_attn():
    """Restore timm's global fused-attention switch after a test flips it."""
    saved = timm.layers.config._USE_FUSED_ATTN
    yield
    timm.layers.config._USE_FUSED_ATTN = saved


def test_vit_is_counted_with_unfused_attention(global_fused_attn):
    kwargs = {"pretrained": False, "num_classes": 10, "img_size": SIZE}
    torch.manual_seed(0)
    fused = timm.create_model("test_vit", **kwargs).eval()
    timm.layers.set_fused_attn(False)
    unfused = timm.create_model("test_vit", **kwargs).eval()
    timm.layers.set_fused_attn(True)
    x = torch.zeros(1, 3, SIZE, SIZE)
    attention = [m for m in fused.modules() if hasattr(m, "fused_attn")]
    assert attention and all(m.fused_attn is True for m in attention)
    assert not any(m.fused_attn for m in unfused.modules() if hasattr(m, "fused_attn"))

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unfused(x)
    reference = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fused(x)
    assert counter.get_total_flops() < reference  # FlopCounterMode misses fused attention on the CPU

    assert count_flops(fused, x) == reference
    gated = timm_dgate.wrap(fused, input_size=(3, SIZE, SIZE))
    assert gated.costs.backbone == reference
    assert all(m.fused_attn is True for m in attention)  # the flags are restored afterwards


def test_unfused_attention_restores_flags_after_an_error():
    model = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=SIZE)
    attention = [m for m in model.modules() if getattr(m, "fused_attn", None) is not None]
    with pytest.raises(RuntimeError, match="boom"), unfused_attention(model):
        assert not any(m.fused_attn for m in attention)
        raise RuntimeError("boom")
    assert all(m.fused_attn is True for m in attention)


class _ClassTokenNet(torch.nn.Module):
    """CaiT's pattern: a parameter expanded to the batch and handed to a block as an input."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 8))
        self.embed = torch.nn.Linear(4, 8)
        self.block = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(2).transpose(1, 2))
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # under no_grad: requires grad, no grad_fn
        return self.block(cls) + tokens.mean(1, keepdim=True)


def test_costs_count_a_forward_that_hands_an_expanded_parameter_to_a_module():
    from timm_dgate.core.costs import costs_to

    net = _ClassTokenNet().eval()
    with torch.no_grad():  # as users call it; the counter's module tracker must not trip on the expanded view
        to_gate, features, total = costs_to(net, ["embed"], (4, 2, 2))
    assert features[0].shape == (1, 4, 8) and not features[0].requires_grad
    assert to_gate[0] == 2 * 4 * 4 * 8  # the embedding alone: 4 tokens x 4 -> 8
    assert total == to_gate[0] + 2 * 8 * 8  # plus the block on the class token


def test_another_thread_calling_the_model_while_costs_are_counted_changes_nothing():
    """A server thread's forward in the middle of the first ``costs`` read neither leaks into the count nor
    sees the counting's eval mode; the count equals one taken alone."""
    torch.manual_seed(0)
    alone = timm_dgate.wrap(timm.create_model("test_resnet", in_chans=1, num_classes=10), input_size=(1, 32, 32))
    want = alone.costs
    served = timm_dgate.wrap(timm.create_model("test_resnet", in_chans=1, num_classes=10), input_size=(1, 32, 32))
    served.train()  # a training thread's model: the count must not flip it to eval under that thread
    modes: list[bool] = []

    def serve() -> None:
        modes.append(served.base_model.training)
        served(torch.randn(8, 1, 32, 32))

    def serve_once(module: torch.nn.Module, args: object, output: object) -> None:
        if not modes:  # the first time layer1 runs: inside the counting pass
            worker = threading.Thread(target=serve)
            worker.start()
            worker.join()

    served.base_model.layer1.register_forward_hook(serve_once)
    got = served.costs
    assert modes == [True]
    assert got == want
