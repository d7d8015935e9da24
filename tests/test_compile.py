"""``gated.compile()`` compiles the work between exits once: graphs do not multiply with batch sizes or exits.

Graphs are counted with dynamo's own counters. The ``eager`` backend keeps the test fast: it
captures the same graphs as inductor would compile, without generating code.
"""

from __future__ import annotations

import copy
import functools
import math
import random

import pytest
import timm
import torch
from torch._dynamo.utils import counters

import timm_dgate
import timm_dgate.deploy.segments

from .helpers import SIZE


def random_thresholds(gated: timm_dgate.GatedModel, scores: list[torch.Tensor], rng: random.Random) -> list[float]:
    """Each gate closed, or open at a random quantile of its scores: a different exit pattern every batch."""
    return [math.inf if rng.random() < 0.3 else s.quantile(rng.random()).item() for s in scores]


def test_compiled_segments_match_eager_and_graphs_do_not_grow_with_sizes_or_exit_patterns():
    torch.manual_seed(0)
    torch._dynamo.reset()
    backbone = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    eager = timm_dgate.wrap(backbone, input_size=(1, SIZE, SIZE))
    for gate in eager.gates:
        torch.nn.init.normal_(gate.fc.weight)
    with torch.no_grad():
        margins, _ = eager.forward_gates(torch.randn(128, 1, SIZE, SIZE))
    scores = [m.amax(1) for m in margins]
    compiled = copy.deepcopy(eager)
    segments = compiled.compile(backend="eager")
    assert segments[:2] == ["conv1", "bn1"] and "layer1.0" in segments and "layer1" not in segments  # hooks stay eager
    for name in segments:  # every listed segment runs compiled: none is left eager behind the list
        forward = compiled.base_model.get_submodule(name).forward
        assert isinstance(forward, functools.partial) and hasattr(forward.func, "_torchdynamo_orig_callable"), name

    counters.clear()
    with torch.no_grad():
        for size in (1, 8, 64):  # one batch per shape bucket dynamo may specialise: 1, small, large
            compiled(torch.randn(size, 1, SIZE, SIZE))
    warm = counters["stats"]["unique_graphs"]
    assert 0 < warm <= 4 * len(segments)

    rng = random.Random(0)
    sizes = set()
    with torch.no_grad():
        for _ in range(30):
            size = rng.randint(1, 256)
            sizes.add(size)
            thresholds = random_thresholds(eager, scores, rng)
            eager.set_thresholds(thresholds)
            compiled.set_thresholds(thresholds)
            x = torch.randn(size, 1, SIZE, SIZE)
            want, got = eager(x, return_exits=True), compiled(x, return_exits=True)
            assert torch.equal(got.exits, want.exits)
            assert torch.allclose(got.logits, want.logits, rtol=0, atol=1e-4)
    assert len(sizes) > 20
    assert counters["stats"]["unique_graphs"] == warm  # 30 new sizes and exit patterns, no new graph
    # and no segment gave up compiling (a shared code object hits dynamo's recompile limit and runs eager)
    assert counters["frames"]["ok"] == counters["frames"]["total"] and not counters["unimplemented"]


def test_compile_twice_or_after_unwrap_is_refused():
    gated = timm_dgate.wrap(timm.create_model("test_resnet", in_chans=1, num_classes=10).eval(),
                            input_size=(1, SIZE, SIZE))
    gated.compile(backend="eager")
    with pytest.raises(RuntimeError, match="already compiled"):
        gated.compile(backend="eager")
    gated.unwrap()
    with pytest.raises(RuntimeError, match="unwrapped"):
        gated.compile(backend="eager")


class _HostReadingHead(torch.nn.Module):
    """A head that reads a value to the host mid-forward: dynamo must break its graph there."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) * (1.0 if x.sum().item() > -1e30 else 0.0)


def test_compile_problem_passes_channels_last_convnext_and_names_a_graph_break():
    """ConvNeXt's stages hand on channels_last tensors: exits must keep that layout or every exit recompiles."""
    convnext = timm.create_model("test_convnext", in_chans=1, num_classes=10).eval()
    assert timm_dgate.deploy.segments.compile_problem(timm_dgate.wrap(convnext, input_size=(1, SIZE, SIZE))) is None
    resnet = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    resnet.fc = _HostReadingHead(resnet.fc)
    problem = timm_dgate.deploy.segments.compile_problem(timm_dgate.wrap(resnet, input_size=(1, SIZE, SIZE)))
    assert problem is not None and "graph breaks" in problem
