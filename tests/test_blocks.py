"""Block-level exits: every block end of a staged network is a place a gate can sit.

``stages(model, level="block")`` lists them probed, with the GFLOPs to reach each;
``wrap(model, gates="blocks")`` gates all that pass, and block names pick any of them.
"""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch

import timm_dgate
from timm_dgate.cli.main import main

SIZE = (3, 64, 64)


@pytest.fixture(scope="module")
def convnext():
    torch.manual_seed(0)
    return timm.create_model("test_convnext", pretrained=False, num_classes=5).eval()


@pytest.fixture(scope="module")
def block_listing(convnext):
    return timm_dgate.stages(convnext, SIZE, level="block")


def test_block_level_lists_every_block_end_with_the_cost_of_reaching_it(convnext, block_listing):
    names = [b.name for b in block_listing]
    assert names == [
        "stages.0", "stages.1.blocks.0", "stages.1", "stages.2.blocks.0", "stages.2.blocks.1", "stages.2.blocks.2",
        "stages.2", "stages.3.blocks.0", "stages.3",
    ]
    assert all(b.problem is None and b.layout == "NCHW" for b in block_listing)
    costs = [b.gflops for b in block_listing]
    assert all(later > earlier for earlier, later in itertools.pairwise(costs))  # deeper costs more
    stage_level = timm_dgate.stages(convnext, SIZE)
    assert {b.name for b in stage_level} <= set(names)
    assert [b.name for b in block_listing if b.default] == [b.name for b in stage_level if b.default]


def test_wrap_with_blocks_gates_every_block_end_and_stays_exact(convnext, block_listing):
    gated = timm_dgate.wrap(convnext, gates="blocks", input_size=SIZE)
    assert [b.name for b in gated.boundaries] == [b.name for b in block_listing if b.reduction >= 4]
    x = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = convnext(x)
        assert torch.allclose(gated(x), plain, atol=1e-5)  # every gate closed: the plain model
        margins, _ = gated.forward_gates(x)
        k = 3  # a gate in the middle of a stage: half the batch leaves there
        thresholds = [math.inf] * gated.num_gates
        thresholds[k] = margins[k].max(1).values.median().item()
        gated.set_thresholds(thresholds)
        result = gated(x, return_exits=True)
    stayed = result.exits == gated.num_gates
    assert 0 < int(stayed.sum()) < 4
    assert torch.allclose(result.logits[stayed], plain[stayed], atol=1e-5)
    assert torch.allclose(result.logits[~stayed], margins[k][~stayed], atol=1e-5)
    gated.unwrap()


def test_block_names_and_stage_names_pick_any_subset_in_network_order(convnext):
    gated = timm_dgate.wrap(convnext, gates=["stages.2.blocks.1", "stages.1"], input_size=SIZE)
    assert [b.name for b in gated.boundaries] == ["stages.1", "stages.2.blocks.1"]
    gated.unwrap()


def test_bad_levels_and_gate_words_are_refused(convnext):
    with pytest.raises(ValueError, match="unknown level 'blocks'"):
        timm_dgate.stages(convnext, SIZE, level="blocks")
    with pytest.raises(ValueError, match="gates='block'"):
        timm_dgate.wrap(convnext, gates="block", input_size=SIZE)
    with pytest.raises(ValueError, match=r"unknown gate position .stages\.9\.blocks\.0."):
        timm_dgate.wrap(convnext, gates=["stages.9.blocks.0"], input_size=SIZE)


def test_cli_stages_lists_block_ends(capsys):
    assert main(["stages", "test_convnext", "--num-classes", "5", "--input-size", "3", "64", "64",
                 "--level", "block"]) == 0
    out = capsys.readouterr().out
    assert "stages.2.blocks.1" in out and "full model" in out
