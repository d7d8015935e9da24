"""Gate heads as a registry: a head registered by name wraps, fits at its own rate, saves and loads back, and
configs written before heads had names (format 1 and 2, ``gate_hidden``) read as they always did."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from torch import nn

import timm_dgate
from timm_dgate import DGateConfig, HubFormatError, register_gate_head
from timm_dgate.core.cache import cache_features
from timm_dgate.core.gates import gate_head
from timm_dgate.fitting.gate_kinds import GateKind, fit_kind

from .helpers import SIZE, batches

NORM_MLP = "test-norm-mlp"


def norm_mlp(num_features: int, num_classes: int, hidden: int, eps: float = 1e-5) -> nn.Sequential:
    """A head unlike the built-in ones: a LayerNorm between its layers, and an option with a default."""
    return nn.Sequential(
        nn.Linear(num_features, hidden), nn.LayerNorm(hidden, eps=eps), nn.GELU(), nn.Linear(hidden, num_classes)
    )


register_gate_head(NORM_MLP, norm_mlp, default_lr=0.02, overwrite=True)  # overwrite: the module may be re-imported


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=10).eval()


def _wrap(**head: object) -> timm_dgate.GatedModel:
    return timm_dgate.wrap(_backbone(), input_size=(1, SIZE, SIZE), **head)


def test_a_registered_head_wraps_fits_at_its_rate_saves_and_loads_back(tmp_path, fmnist):
    kind = GateKind(loss="ce", head=NORM_MLP, head_options={"hidden": 8})
    assert kind.lr == 0.02
    gated = _wrap(gate_head=kind.head, gate_head_options=kind.head_options)
    assert isinstance(gated.gates[0].hidden[1], nn.LayerNorm)
    cache = cache_features(gated, batches(fmnist.train), progress=False)
    report = fit_kind(gated, cache, kind, epochs=20, progress=False)
    assert min(report.train_accuracy) > 0.3  # a random backbone's features, 10 classes: chance is 0.1
    x = batches(fmnist.train)[0][0]
    from_images, _ = gated.forward_gates(x)  # the standardisation folded into the first layer, LayerNorm after it
    for k, margins in enumerate(cache.margins(gated.gates)):
        torch.testing.assert_close(from_images[k], margins[: len(x)], atol=1e-4, rtol=1e-4)

    gated.set_thresholds([from_images[0].softmax(1).amax(1).median().item(), math.inf, math.inf])  # half exit
    gated.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "dgate_config.json").read_text())
    assert config["format_version"] == 3 and "gate_hidden" not in config  # older readers refuse what they cannot build
    assert config["gate_head"] == NORM_MLP and config["gate_head_options"] == {"hidden": 8}
    loaded = timm_dgate.from_pretrained(tmp_path)
    assert loaded.config.gate_head == NORM_MLP and loaded.config.gate_head_options == {"hidden": 8}
    a, b = gated(x, return_exits=True), loaded(x, return_exits=True)
    assert torch.equal(a.exits, b.exits) and 0 < (a.exits < gated.num_gates).sum() < len(x)
    torch.testing.assert_close(a.logits, b.logits)

    config["gate_head"] = "not-registered-here"
    (tmp_path / "dgate_config.json").write_text(json.dumps(config))
    with pytest.raises(HubFormatError, match=r"unknown gate head 'not-registered-here'.*register_gate_head"):
        timm_dgate.from_pretrained(tmp_path)


def test_fit_takes_the_heads_default_rate_when_given_none(fmnist):
    data = batches(fmnist.train)[:2]
    gates = {}
    for lr in (None, 0.02, 0.03):
        gated = _wrap(gate_head=NORM_MLP, gate_head_options={"hidden": 8})
        timm_dgate.fit(gated, data, loss="ce", epochs=2, lr=lr, progress=False)
        gates[lr] = torch.cat([p.detach().flatten() for p in gated.gates.parameters()])
    assert torch.equal(gates[None], gates[0.02]) and not torch.equal(gates[None], gates[0.03])


def test_gate_hidden_is_shorthand_for_the_mlp_head():
    assert _wrap(gate_hidden=16).config == _wrap(gate_head="mlp", gate_head_options={"hidden": 16}).config
    assert _wrap().config.gate_head == "linear"
    with pytest.raises(ValueError, match="not both"):
        _wrap(gate_hidden=16, gate_head=NORM_MLP)
    with pytest.raises(ValueError, match="gate_hidden must be 0"):
        _wrap(gate_hidden=-1)


def test_bad_heads_and_options_are_refused_by_name():
    with pytest.raises(ValueError, match="already registered"):
        register_gate_head("mlp", norm_mlp, default_lr=0.01)
    with pytest.raises(ValueError, match="default_lr must be positive"):
        register_gate_head("test-no-rate", norm_mlp, default_lr=0)
    with pytest.raises(ValueError, match="unknown gate head 'svm'; expected one of linear, mlp"):
        _wrap(gate_head="svm")
    with pytest.raises(ValueError, match="gate head 'mlp' does not take the options"):
        _wrap(gate_head="mlp", gate_head_options={"width": 16})
    with pytest.raises(ValueError, match="must be JSON values"):
        _wrap(gate_head="mlp", gate_head_options={"hidden": torch.tensor(16)})
    with pytest.raises(ValueError, match="positive hidden width"):
        _wrap(gate_head="mlp", gate_head_options={"hidden": 0})
    register_gate_head("test-no-linear", lambda f, c: nn.Sequential(nn.Identity(), nn.Linear(f, c)), default_lr=0.01,
                       overwrite=True)
    with pytest.raises(TypeError, match=r"first layer is an nn\.Linear"):
        _wrap(gate_head="test-no-linear")


def _config(version: int, **fields: object) -> dict:
    """A config as the writer of ``version`` left it (format 1: no ``gate_hidden`` at all)."""
    return {
        "format_version": version, "architecture": "test_resnet", "num_classes": 10, "input_size": [1, 32, 32],
        "backbone": {"source": "folder"}, "pool": "avg", "exit_score": "margin",
        "gates": [{"name": "layer1", "module": "layer1", "num_chs": 8, "layout": "NCHW"}], **fields,
    }


@pytest.mark.parametrize(
    ("version", "fields", "head", "options"),
    [
        (1, {}, "linear", {}),
        (1, {"gate_hidden": 0}, "linear", {}),
        (2, {"gate_hidden": 16}, "mlp", {"hidden": 16}),
        (2, {"gate_hidden": 16, "gate_head": NORM_MLP}, "mlp", {"hidden": 16}),  # format 2 knows no gate_head
        (3, {}, "linear", {}),
        (3, {"gate_head": "mlp", "gate_head_options": {"hidden": 4}}, "mlp", {"hidden": 4}),
    ],
)
def test_configs_of_every_format_read_their_head(version, fields, head, options):
    config = DGateConfig.from_dict(_config(version, **fields))
    assert (config.gate_head, config.gate_head_options, config.format_version) == (head, options, version)


@pytest.mark.parametrize(
    ("head", "options", "version"), [("linear", {}, 1), ("mlp", {"hidden": 16}, 2), (NORM_MLP, {"hidden": 8}, 3)]
)
def test_older_formats_are_written_where_they_hold_the_head(head, options, version):
    """Linear and MLP gates are written as before (``gate_hidden``: readers of format 1 and 2 load them); any other
    head as format 3, which those readers refuse rather than misread."""
    config = DGateConfig.from_dict(_config(3, gate_head=head, gate_head_options=options))
    written = config.to_dict()
    assert written["format_version"] == version
    assert ("gate_hidden" in written, "gate_head" in written) == (version < 3, version == 3)
    assert DGateConfig.from_dict(written).replace(format_version=3) == config


def test_a_bad_gate_hidden_in_an_old_config_is_a_format_error_and_the_rates_sit_on_the_heads():
    with pytest.raises(HubFormatError, match="gate_hidden must be 0"):
        DGateConfig.from_dict(_config(2, gate_hidden=-4))
    assert gate_head("linear").default_lr > gate_head("mlp").default_lr  # linear gates are convex: larger steps
