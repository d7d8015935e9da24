"""Gate kinds beyond the paper's linear hinge gate: MLP gates, distillation from the backbone, survivor weighting.

Each kind must work with everything a linear gate works with (the early-exit forward, the cost
model, the Hub format), and train what it says it trains.
"""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch

import timm_dgate
from timm_dgate.core.cache import FeatureCache, cache_features
from timm_dgate.core.losses import cross_entropy
from timm_dgate.errors import HubFormatError
from timm_dgate.fitting.gate_kinds import GATE_KINDS, fit_kind, gate_kind
from timm_dgate.fitting.training import fit, survivor_weights

from .helpers import SIZE, batches, trained_gated


def _mlp_gated(hidden: int = 16) -> timm_dgate.GatedModel:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=10).eval()
    return timm_dgate.wrap(model, input_size=(1, SIZE, SIZE), gate_hidden=hidden)


@pytest.fixture(scope="module")
def trained_caches(trained_backbone, fmnist) -> tuple[FeatureCache, FeatureCache]:
    """Train and validation caches of the trained test backbone: each test fits fresh gates on them."""
    gated = trained_gated(trained_backbone)
    return (cache_features(gated, batches(fmnist.train), progress=False),
            cache_features(gated, batches(fmnist.val), split="validation", progress=False))


def test_mlp_gates_keep_the_plain_logits_when_closed_and_exit_exactly_when_open(fmnist):
    gated = _mlp_gated()
    x = batches(fmnist.val)[0][0][:32]
    assert torch.equal(gated(x), gated.base_model(x))
    fit(gated, batches(fmnist.train), loss="ce", epochs=20, progress=False)
    gated.set_thresholds([0.0, math.inf, math.inf])  # everyone leaves at the first (MLP) gate
    gate_logits, _ = gated.forward_gates(x)
    result = gated(x, return_exits=True)
    assert (result.exits == 0).all()
    torch.testing.assert_close(result.logits, gate_logits[0])


def test_mlp_gate_fit_folds_the_standardisation_so_cache_and_model_agree(fmnist):
    """The trainer works on standardised features and folds that into the first layer: the gate the model runs
    must give the margins the trainer optimised, on the cache and on images alike."""
    gated = _mlp_gated()
    cache = cache_features(gated, batches(fmnist.train), progress=False)
    report = fit(gated, cache, loss="ce", epochs=40, lr=0.02, progress=False)
    assert min(report.train_accuracy) > 0.3  # a random backbone's features, 10 classes: chance is 0.1
    x = batches(fmnist.train)[0][0]
    from_images, _ = gated.forward_gates(x)
    from_cache = cache.margins(gated.gates)
    for k in range(gated.num_gates):
        torch.testing.assert_close(from_images[k], from_cache[k][: len(x)], atol=1e-4, rtol=1e-4)


def test_mlp_gates_are_counted_in_the_flops_and_cost_more_than_linear_ones():
    linear, mlp = _mlp_gated(hidden=0), _mlp_gated(hidden=64)
    assert linear.costs.backbone == mlp.costs.backbone
    for k in range(linear.num_gates):
        # a hidden layer of 64 over C features costs 2*64*(C + 10) more FLOPs than the linear C -> 10 layer
        assert mlp.costs.gate[k] > linear.costs.gate[k] + 2 * 64 * 10


def test_mlp_gates_round_trip_through_the_hub_format_as_version_2(tmp_path, fmnist):
    gated = _mlp_gated()
    fit(gated, batches(fmnist.train), loss="ce", epochs=5, progress=False)
    gated.set_thresholds([0.5, 0.5, math.inf])
    gated.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "dgate_config.json").read_text())
    assert config["format_version"] == 2 and config["gate_hidden"] == 16  # a version-1 reader refuses it
    loaded = timm_dgate.from_pretrained(tmp_path)
    assert loaded.config.gate_head == "mlp" and loaded.config.gate_head_options == {"hidden": 16}
    x = batches(fmnist.val)[0][0][:40]
    a, b = gated(x, return_exits=True), loaded(x, return_exits=True)
    assert torch.equal(a.exits, b.exits)
    torch.testing.assert_close(a.logits, b.logits)


def test_linear_gates_are_still_written_as_version_1(tmp_path):
    _mlp_gated(hidden=0).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "dgate_config.json").read_text())["format_version"] == 1


def test_gate_weights_that_do_not_match_the_hidden_width_are_refused(tmp_path):
    _mlp_gated(hidden=16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "dgate_config.json").read_text())
    (tmp_path / "dgate_config.json").write_text(json.dumps(config | {"gate_hidden": 8}))
    with pytest.raises(HubFormatError, match=r"hidden\.0\.weight has shape"):
        timm_dgate.from_pretrained(tmp_path)


def test_distillation_trains_towards_the_backbones_own_predictions(trained_caches):
    """With ``distill=1`` the gates minimise cross-entropy to the head's softmax: each ends closer to it than
    gates fit on the labels alone, and the weight is recorded where save_pretrained writes it."""
    train, _ = trained_caches
    teacher = train.logits.float().softmax(1)

    def to_teacher(gated) -> list[float]:
        return [cross_entropy(m, teacher).item() for m in train.margins(gated.gates)]

    labels, distilled = trained_gated_copy(), trained_gated_copy()
    fit(labels, train, loss="ce", epochs=60, progress=False)
    fit(distilled, train, loss="ce", distill=1.0, epochs=60, progress=False)
    assert all(d < x for d, x in zip(to_teacher(distilled), to_teacher(labels)))
    assert distilled.gate_distill == 1.0 and distilled.config.to_dict()["gate_distill"] == 1.0
    assert labels.gate_distill == 0.0


def trained_gated_copy() -> timm_dgate.GatedModel:
    """Fresh gates on a throwaway backbone of the cached one's shape: the caches hold every input the fit reads."""
    return _mlp_gated(hidden=0)


def test_distillation_needs_cross_entropy_and_a_weight_in_range(trained_caches):
    train, _ = trained_caches
    with pytest.raises(ValueError, match="needs loss='ce'"):
        fit(trained_gated_copy(), train, loss="hinge", distill=0.5, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fit(trained_gated_copy(), train, loss="ce", distill=1.5, epochs=1, progress=False)


def test_survivor_weights_put_the_floor_on_samples_an_earlier_gate_sent_away(trained_caches):
    train, _ = trained_caches
    gated = trained_gated_copy()
    fit(gated, train, loss="ce", epochs=50, progress=False)
    assert all(torch.equal(w, torch.ones(len(train))) for w in survivor_weights(gated, train))  # closed gates
    gated.set_thresholds([0.8, math.inf, 0.9])
    weights = survivor_weights(gated, train, floor=0.25)
    left_at_0 = train.margins(gated.gates)[0].softmax(1).amax(1) >= 0.8
    assert 0 < left_at_0.sum() < len(train)
    assert torch.equal(weights[0], torch.ones(len(train)))
    assert torch.equal(weights[1], torch.where(left_at_0, 0.25, 1.0))
    assert torch.equal(weights[2], weights[1])  # gate 1 is closed: it sends nobody away


def test_survivor_weighted_refit_spends_the_gate_on_the_samples_that_reach_it(trained_caches):
    """Refit with weight only on the survivors of gate 0, gate 1 classifies those better than before."""
    train, _ = trained_caches
    gated = trained_gated_copy()
    fit(gated, train, loss="ce", epochs=60, progress=False)
    gated.set_thresholds([0.6, math.inf, math.inf])
    weights = survivor_weights(gated, train, floor=0.0)
    survivors = weights[1].bool()

    def gate1_loss() -> float:
        return cross_entropy(train.margins(gated.gates)[1][survivors], train.labels[survivors]).item()

    before = gate1_loss()
    fit(gated, train, loss="ce", epochs=60, sample_weights=weights, progress=False)
    assert gate1_loss() < before


def test_sample_weights_must_match_the_cache(trained_caches):
    train, _ = trained_caches
    with pytest.raises(ValueError, match="one per cached row"):
        fit(trained_gated_copy(), train, sample_weights=[torch.ones(3)] * 3, epochs=1, progress=False)


def test_fit_kind_refuses_a_model_wrapped_for_another_kind(trained_caches):
    train, val = trained_caches
    with pytest.raises(ValueError, match=r"gate_head='mlp', gate_head_options=\{'hidden': 128\}"):
        fit_kind(trained_gated_copy(), train, GATE_KINDS["mlp"], val, epochs=1, progress=False)
    with pytest.raises(ValueError, match="pass val="):
        fit_kind(trained_gated_copy(), train, GATE_KINDS["survivors"], epochs=1, progress=False)
    with pytest.raises(ValueError, match="unknown gate kind 'svm'"):
        gate_kind("svm")


def test_survivor_kind_leaves_closed_gates_and_no_stale_profile(trained_caches):
    """The thresholds a survivor round calibrates belong to gates that are then refit: none may survive the fit."""
    train, val = trained_caches
    gated = trained_gated_copy()
    fit_kind(gated, train, GATE_KINDS["survivors"], val, epochs=30, progress=False)
    assert gated.profiles == {} and gated.active_profile is None
    assert all(t == math.inf for t in gated.thresholds)
    assert gated.gate_loss == "ce" and gated.exit_score == "softmax"


def test_a_plain_fit_of_mlp_gates_trains_them_as_the_measured_mlp_kind(trained_backbone, trained_caches):
    """``wrap(..., gate_hidden=128)`` then ``fit(model, data, loss="ce")``: the Python API's defaults give the gates
    the benchmarks measured as ``mlp`` (its rate, not the linear gates' twenty times larger one)."""
    train, _ = trained_caches
    gates = []
    for how in ("fit", "kind"):
        torch.manual_seed(0)
        gated = trained_gated(trained_backbone, gate_hidden=GATE_KINDS["mlp"].head_options["hidden"])
        if how == "fit":
            fit(gated, train, loss="ce", epochs=30, progress=False)
        else:
            fit_kind(gated, train, GATE_KINDS["mlp"], epochs=30, progress=False)
        gates.append([p.detach().clone() for p in gated.gates.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*gates, strict=True))
