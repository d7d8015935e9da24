"""Refusals are clear: ``wrap`` names the model, the boundary and the reason, up front.

A boundary that cannot work as an exit must fail in ``timm_dgate.wrap`` with
:class:`UnsupportedModelError`, never later as a shape error from inside timm. Most cases use
tiny hand-written timm-like models (``feature_info`` + ``num_classes``) so each bad pattern is
isolated and the tests stay fast; one real timm model (xception41) guards the shortcut case.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import timm
import torch
from torch import nn

import timm_dgate
from timm_dgate.boundaries import discovery
from timm_dgate.core.scores import exit_score

SIZE = (3, 16, 16)


class TinyNet(nn.Module):
    """A timm-like classifier: three stages listed in ``feature_info`` and a linear head."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, num_classes)
        self.feature_info = [
            {"module": "stage1", "num_chs": 8, "reduction": 4},
            {"module": "stage2", "num_chs": 16, "reduction": 8},
            {"module": "stage3", "num_chs": 16, "reduction": 16},
        ]

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage3(self.stage2(self.stage1(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x).mean((2, 3)))


class ShortcutNet(TinyNet):
    """The boundary sits inside a residual block: the shortcut still holds the full batch."""

    def __init__(self):
        super().__init__()
        self.feature_info[0] = {"module": "stage1.1", "num_chs": 8, "reduction": 4}

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage1(x) + x
        return self.stage3(self.stage2(x))


class LostNameNet(TinyNet):
    """``feature_info`` names a module that the model does not have (like twins' ``block.i``)."""

    def __init__(self):
        super().__init__()
        self.feature_info[1] = {"module": "blocks.1", "num_chs": 16, "reduction": 4}  # stage2: 16 x 4 x 4


class BogusNameNet(TinyNet):
    """A name that is no module, with a shape that no module outputs either."""

    def __init__(self):
        super().__init__()
        self.feature_info[1] = {"module": "blocks.1", "num_chs": 12, "reduction": 8}


class PairStage(nn.Module):
    def __init__(self, stage: nn.Module):
        super().__init__()
        self.inner = stage

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.inner(x)
        return y, y


class TupleNet(TinyNet):
    """A stage hands a tuple to the next one (like tnt's blocks or selecsls' features)."""

    def __init__(self):
        super().__init__()
        self.stage2 = PairStage(self.stage2)

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.stage2(self.stage1(self.stem(x)))
        return self.stage3(y)


class DictStage(PairStage):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self.inner(x)}


class DictNet(TinyNet):
    """A stage hands a dict to the next one: which entry carries the batch is not knowable."""

    def __init__(self):
        super().__init__()
        self.stage2 = DictStage(self.stage2)

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage3(self.stage2(self.stage1(self.stem(x)))["features"])


class ModuleShortcutNet(TinyNet):
    """Like ShortcutNet, but the shortcut runs through a module, which the engine can cut to the survivors."""

    def __init__(self):
        super().__init__()
        self.feature_info[0] = {"module": "stage1.1", "num_chs": 8, "reduction": 4}
        self.shortcut = nn.Conv2d(8, 8, 1)

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage1(x) + self.shortcut(x)
        return self.stage3(self.stage2(x))


class TwiceNet(TinyNet):
    """A boundary module that runs twice per forward."""

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stage1(self.stem(x)))
        return self.stage3(self.stage2(x))


class NotBatchFirstNet(TinyNet):
    """A stage emits its output with the batch moved off the first dimension."""

    def __init__(self):
        super().__init__()
        self.stage2 = nn.Sequential(self.stage2, Transpose())

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))  # (C, B, H, W)
        return self.stage3(x.transpose(0, 1))


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)


class WrongChannelsNet(TinyNet):
    """``feature_info`` gives a channel count that the stage's output does not have."""

    def __init__(self):
        super().__init__()
        self.feature_info[1] = {"module": "stage2", "num_chs": 12, "reduction": 8}


class BatchCentre(nn.Module):
    """Subtracts the batch mean: each sample's output depends on which others are in the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class BatchNormalisedNet(TinyNet):
    """A layer after the first boundary normalises across the batch (no shape changes, so nothing errors)."""

    def __init__(self):
        super().__init__()
        self.stage2 = nn.Sequential(self.stage2, BatchCentre())


class StoredBatchNet(TinyNet):
    """The forward reads the batch size at its start and divides a batch sum by it later."""

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x = self.stage2(self.stage1(self.stem(x)))
        return self.stage3(x - x.sum(0, keepdim=True) / batch)


MIXED = "samples that go on get different logits once others leave there"
REFUSED = [  # (model class, refused boundary, words of the reason)
    (ShortcutNet, "stage1.1", "removing samples there breaks the rest of the forward"),
    (BogusNameNet, "blocks.1", "no module outputs 12 channels at 1/8 of the input"),
    (DictNet, "stage2", "outputs dict, not a tensor, tuple or list"),
    (TwiceNet, "stage1", "runs 2 times"),
    (NotBatchFirstNet, "stage2", "first dimension is not the batch"),
    (WrongChannelsNet, "stage2", "no 12-channel layout"),
    (BatchNormalisedNet, "stage1", MIXED),
    (StoredBatchNet, "stage1", MIXED),
]


def make(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


@pytest.mark.parametrize(("cls", "boundary", "reason"), REFUSED, ids=[c[0].__name__ for c in REFUSED])
def test_wrap_refuses_with_model_boundary_and_reason(cls, boundary, reason):
    model = make(cls)
    with pytest.raises(timm_dgate.UnsupportedModelError) as caught:
        timm_dgate.wrap(model, input_size=SIZE)
    error = caught.value
    assert (error.model, error.boundary) == (cls.__name__, boundary)
    assert reason in error.reason
    assert cls.__name__ in str(error) and f"'{boundary}'" in str(error) and reason in str(error)


@pytest.mark.parametrize(("cls", "boundary", "reason"), REFUSED, ids=[c[0].__name__ for c in REFUSED])
def test_stages_lists_refused_boundaries_instead_of_raising(cls, boundary, reason):
    found = timm_dgate.stages(make(cls), SIZE)
    assert [b.name for b in found] == [e["module"] for e in cls().feature_info]
    by_name = {b.name: b for b in found}
    assert reason in by_name[boundary].problem
    assert by_name["stage3"].problem is None and by_name["stage3"].layout == "NCHW"


def test_other_boundaries_of_a_refused_model_still_wrap():
    gated = timm_dgate.wrap(make(ShortcutNet), gates=["stage2"], input_size=SIZE)
    assert [b.name for b in gated.boundaries] == ["stage2"]


def test_plain_tinynet_wraps():
    """The hand-made base model itself is fine, so each refusal above is due to its one change."""
    gated = timm_dgate.wrap(make(TinyNet), input_size=SIZE)
    assert [b.name for b in gated.boundaries] == ["stage1", "stage2"]


def test_a_missing_feature_info_name_is_found_by_its_shape():
    gated = timm_dgate.wrap(make(LostNameNet), input_size=SIZE)
    assert [(b.name, b.module) for b in gated.boundaries] == [("stage1", "stage1"), ("blocks.1", "stage2")]


def test_a_tuple_stage_output_is_gated_on_its_feature_tensor():
    gated = timm_dgate.wrap(make(TupleNet), input_size=SIZE)
    assert [(b.name, b.part, b.layout) for b in gated.boundaries] == [("stage1", None, "NCHW"), ("stage2", 0, "NCHW")]


def test_a_shortcut_through_a_module_is_realigned_and_exact():
    """The shortcut's input still has the full batch after the exit; the engine cuts it to the survivors."""
    model = make(ModuleShortcutNet)
    gated = timm_dgate.wrap(model, gates=["stage1.1"], input_size=SIZE)
    assert gated.boundaries[0].realign
    x = torch.randn(5, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        margins, _ = gated.forward_gates(x)
        gated.set_thresholds([exit_score(margins[0], gated.exit_score).median().item()])
        result, plain = gated(x, return_exits=True), model(x)
    stayed = result.exits == 1
    assert 0 < int(stayed.sum()) < 5
    assert torch.allclose(result.logits[stayed], plain[stayed], atol=1e-6)


def test_real_timm_shortcut_inside_block_is_realigned():
    """xception41's feature_info names ``blocks.N.stack.act3``, inside a block whose shortcut is a conv."""
    model = timm.create_model("xception41", pretrained=False, num_classes=5).eval()
    gated = timm_dgate.wrap(model, gates=["blocks.1.stack.act3"], input_size=(3, 64, 64))
    assert gated.boundaries[0].realign


def test_model_without_feature_info_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model.num_classes = 2
    with pytest.raises(timm_dgate.UnsupportedModelError, match=r"cannot gate Sequential: .*no feature_info"):
        timm_dgate.wrap(model, input_size=SIZE)
    with pytest.raises(timm_dgate.UnsupportedModelError, match="no feature_info"):
        timm_dgate.stages(model, SIZE)


def test_model_without_classifier_is_refused_before_probing():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    with pytest.raises(timm_dgate.UnsupportedModelError, match=r"cannot gate test_resnet: .*num_classes=0"):
        timm_dgate.wrap(model, input_size=(3, 32, 32))


@pytest.fixture(scope="module")
def test_resnet():
    return timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()


@pytest.mark.parametrize(
    ("gates", "message"),
    [
        (["layer9"], "unknown gate position 'layer9'"),
        ([7], "gate index 7 is out of range"),
        ([-6], "gate index -6 is out of range"),
        ([1, "layer1"], "name the same boundary twice"),
    ],
)
def test_bad_gate_positions_list_the_valid_ones(test_resnet, gates, message):
    with pytest.raises(ValueError, match=message) as caught:
        timm_dgate.wrap(test_resnet, gates=gates, input_size=(3, 32, 32))
    assert not isinstance(caught.value, timm_dgate.UnsupportedModelError)
    if "twice" not in message:
        assert "act1, layer1, layer2, layer3, layer4" in str(caught.value)


@contextmanager
def registry_restored() -> Iterator[None]:
    """The family registry is global: changes made inside are undone on leaving."""
    saved = dict(discovery._FAMILY_RULES)
    try:
        yield
    finally:
        discovery._FAMILY_RULES.clear()
        discovery._FAMILY_RULES.update(saved)


@pytest.fixture
def family_rules():
    """Registry changes made by a test are undone afterwards."""
    with registry_restored():
        yield


def test_register_family_overrides_placement(test_resnet, family_rules):
    assert timm_dgate.family_of(test_resnet) == "resnet"
    timm_dgate.register_family("resnet", placement=lambda boundaries: [len(boundaries) - 2])
    gated = timm_dgate.wrap(test_resnet, input_size=(3, 32, 32))
    assert [b.name for b in gated.boundaries] == ["layer3"]
    defaults = [b.name for b in timm_dgate.stages(test_resnet, (3, 32, 32)) if b.default]
    assert defaults == ["layer3"]


def test_register_family_overrides_boundaries(test_resnet, family_rules):
    only_layer2 = [b for b in discovery.feature_boundaries(test_resnet) if b.name in ("layer2", "layer4")]
    timm_dgate.register_family("resnet", boundaries=lambda model: only_layer2)
    assert [b.name for b in timm_dgate.stages(test_resnet, (3, 32, 32))] == ["layer2", "layer4"]


def test_register_family_marks_unsupported(test_resnet, family_rules):
    timm_dgate.register_family("resnet", unsupported="its stages are secretly recurrent")
    with pytest.raises(timm_dgate.UnsupportedModelError, match="test_resnet: its stages are secretly recurrent"):
        timm_dgate.wrap(test_resnet, input_size=(3, 32, 32))
    with pytest.raises(timm_dgate.UnsupportedModelError, match="secretly recurrent"):
        timm_dgate.stages(test_resnet, (3, 32, 32))


def test_registry_changes_are_undone_whatever_the_test_order(test_resnet):
    """The tests above register rules for resnet; none of it may leak into later tests, in any order."""
    with registry_restored():
        timm_dgate.register_family("resnet", placement=lambda boundaries: [0])
        assert [b.name for b in timm_dgate.wrap(test_resnet, input_size=(3, 32, 32)).boundaries] == ["act1"]
    gated = timm_dgate.wrap(test_resnet, input_size=(3, 32, 32))
    assert [b.name for b in gated.boundaries] == ["layer1", "layer2", "layer3"]
