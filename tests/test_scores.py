"""Exit scores, checked by hand: a sample exits when its score reaches the threshold, so higher = more confident."""

from __future__ import annotations

import math

import pytest
import torch

from timm_dgate.core.scores import EXIT_SCORES, exit_score

# row 0: confident in class 0; row 1: no idea (uniform)
MARGINS = torch.tensor([[2.0, 0.0, 0.0], [0.5, 0.5, 0.5]])


def test_softmax_score_is_the_top_class_probability():
    confident = math.exp(2) / (math.exp(2) + 2)
    assert exit_score(MARGINS, "softmax").tolist() == pytest.approx([confident, 1 / 3], rel=1e-6)


def test_entropy_score_is_minus_the_entropy_of_the_softmax():
    p = torch.tensor([math.exp(2), 1.0, 1.0]) / (math.exp(2) + 2)
    minus_entropy = (p * p.log()).sum().item()
    assert exit_score(MARGINS, "entropy").tolist() == pytest.approx([minus_entropy, -math.log(3)], rel=1e-6)


def test_margin_score_is_the_largest_margin():
    assert exit_score(MARGINS, "margin").tolist() == [2.0, 0.5]


@pytest.mark.parametrize("kind", EXIT_SCORES)
def test_every_score_ranks_the_confident_sample_higher(kind):
    confident, unsure = exit_score(MARGINS, kind).tolist()
    assert confident > unsure
