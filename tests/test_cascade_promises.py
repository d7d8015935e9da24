"""A cascade keeps its promises or refuses: one mode for all members, the preprocessing it takes, dtypes,
and no stale thresholds after a member's exits change."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import timm_dgate
from timm_dgate import ExportError

from .helpers import SIZE

SMALL = (1, 16, 16)


def members(seed: int = 0) -> tuple[torch.nn.Module, timm_dgate.GatedModel]:
    torch.manual_seed(seed)
    small = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    backbone = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    big = timm_dgate.wrap(backbone, input_size=(1, SIZE, SIZE))
    return small, big


def test_members_in_different_modes_are_refused_and_one_mode_is_kept():
    small, big = members()
    small.train()  # timm's default: a user who forgot .eval() on one member
    with pytest.raises(ValueError, match=r"member\(s\) \[0\] are in train mode.*call \.eval\(\)"):
        timm_dgate.cascade([small, big], input_sizes=[SMALL, None])
    small.eval()
    assert not timm_dgate.cascade([small, big], input_sizes=[SMALL, None]).training


def test_timm_resolves_the_configuration_the_cascade_takes():
    small, big = members()
    model = timm_dgate.cascade([small, big], input_sizes=[SMALL, None])
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (1, SIZE, SIZE) == model.input_size
    assert config["mean"] == timm.data.resolve_model_data_config(big)["mean"]


def test_input_sizes_that_contradict_a_members_channels_are_refused():
    small, big = members()
    with pytest.raises(ValueError, match=r"input_sizes\[0\] is \(3, 16, 16\), but member 0 takes 1 channels"):
        timm_dgate.cascade([small, big], input_sizes=[(3, 16, 16), None])


@torch.no_grad()
def test_bfloat16_members_at_different_sizes_run_and_resize_as_in_float32():
    small, big = members()
    model = timm_dgate.cascade([small, big], input_sizes=[SMALL, None]).to(torch.bfloat16)
    model.set_thresholds([-math.inf] + [math.inf] * 3)  # everyone leaves at member 0's head: the resize runs
    x = torch.randn(6, 1, SIZE, SIZE).to(torch.bfloat16)
    out = model(x, return_exits=True)
    assert out.logits.dtype == torch.bfloat16 and out.exits.eq(0).all()
    resized = torch.nn.functional.interpolate(x.float(), size=SMALL[1:], mode="bilinear", antialias=True)
    assert torch.equal(out.logits, small(resized.to(torch.bfloat16)))


def test_export_of_a_cascade_says_what_works_instead(tmp_path):
    small, big = members()
    model = timm_dgate.cascade([small, big], input_sizes=[SMALL, None])
    with pytest.raises(ExportError, match=r"export\(cascade.members\[i\], folder\)"):
        timm_dgate.export(model, tmp_path / "cascade")
    assert not (tmp_path / "cascade").exists()


@torch.no_grad()
def test_thresholds_made_stale_by_pruning_a_member_are_refused_not_applied_to_other_exits(tmp_path):
    small, big = members()
    model = timm_dgate.cascade([small, big], input_sizes=[SMALL, None])
    model.set_thresholds([0.5, 1.0, math.inf, math.inf])
    model.add_profile(timm_dgate.Profile("four", [0.5, 1.0, math.inf, math.inf], exit_score="softmax"))
    big.set_thresholds([1.0, math.inf, math.inf])
    big.prune()  # member 1 keeps one gate: the cascade has 2 exits with thresholds now, not 4
    assert model.num_gates == 2
    with pytest.raises(ValueError, match="the policy has 4 thresholds; this cascade has 2"):
        model(torch.randn(4, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="the policy has 4 thresholds; this cascade has 2"):
        model.save_pretrained(tmp_path / "stale")
    model.set_thresholds([0.5, 1.0])
    with pytest.raises(ValueError, match=r"profile\(s\) four no longer match this cascade's 2 exits"):
        model.save_pretrained(tmp_path / "stale")
    assert not (tmp_path / "stale").exists()
