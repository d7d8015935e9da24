"""A new user's first minutes: wrapping a model whose head was never trained says so."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_dgate
from timm_dgate.errors import UntrainedHeadWarning

from .helpers import SIZE


def test_wrap_warns_when_the_head_is_still_at_torchs_default_initialisation():
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    with pytest.warns(UntrainedHeadWarning, match="torch's default uniform initialisation.*Gates learn to agree"):
        timm_dgate.wrap(model, input_size=(1, SIZE, SIZE))


def test_wrap_warns_when_timm_replaced_the_checkpoints_head():
    """``pretrained=True, num_classes=N`` keeps the body and initialises a new head (bias exactly zero)."""
    model = timm.create_model("test_convnext", num_classes=10).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": 1000}  # as after loading a 1000-class checkpoint
    with pytest.warns(UntrainedHeadWarning, match="pretrained config has 1000 classes and the model 10"):
        timm_dgate.wrap(model, input_size=(3, 64, 64))


def test_wrap_does_not_warn_for_a_trained_head(recwarn):
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    with torch.no_grad():  # weights a training run would leave: spread beyond the init bound, bias non-zero
        model.get_classifier().weight.normal_(0, 0.2)
        model.get_classifier().bias.normal_(0, 0.1)
    timm_dgate.wrap(model, input_size=(1, SIZE, SIZE))
    assert not [w for w in recwarn if issubclass(w.category, UntrainedHeadWarning)]
