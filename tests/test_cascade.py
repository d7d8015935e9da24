"""Cascades: members' heads as exits, real early exit across members, one calibration, save/load, refusals."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from huggingface_hub import constants
from torch import nn

import timm_dgate
from timm_dgate import HubFormatError
from timm_dgate.cli import main as cli
from timm_dgate.core.profiles import Profile
from timm_dgate.models.resize import resize

from .helpers import SIZE, batches
from .test_recipe import checkpoint, image_folder  # noqa: F401 - module fixtures, reused

SMALL = (1, 16, 16)  # the cheap member reads the batch at half size
BATCH = 24


def random_pair(seed: int = 0) -> tuple[nn.Module, timm_dgate.GatedModel]:
    """A plain tiny timm model and a gated one with random gates (so gates really open)."""
    torch.manual_seed(seed)
    small = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    big = timm_dgate.wrap(
        timm.create_model("test_resnet", in_chans=1, num_classes=10).eval(), input_size=(1, SIZE, SIZE)
    )
    for gate in big.gates:
        nn.init.normal_(gate.fc.weight)
        nn.init.normal_(gate.fc.bias)
    return small, big


@pytest.fixture
def pair():
    small, big = random_pair()
    return small, big, timm_dgate.cascade([small, big], input_sizes=[SMALL, None])


@pytest.fixture
def x():
    return torch.randn(BATCH, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def quantile_thresholds(model: timm_dgate.Cascade, x: torch.Tensor, q: float) -> list[float]:
    """Thresholds at the ``q`` quantile of each exit's scores on ``x``: every exit lets some samples out."""
    caches = model.cache_features([(x, torch.zeros(len(x), dtype=torch.long))], "probe", progress=False)
    table = model.exit_table(caches)
    return [s.quantile(q).item() for s in table.scores]


@torch.no_grad()
def test_closed_exits_are_the_last_members_plain_logits_and_train_mode_never_exits(pair, x):
    _small, big, model = pair
    assert model.num_gates == 4 and model.thresholds == (math.inf,) * 4
    assert model.exit_names == [
        "0:test_resnet.head", "1:test_resnet.layer1", "1:test_resnet.layer2", "1:test_resnet.layer3",
        "1:test_resnet.head",
    ]  # fmt: skip
    out = model(x, return_exits=True)
    assert torch.equal(out.logits, big.base_model(x))
    assert out.exits.tolist() == [model.num_gates] * BATCH
    model.set_thresholds([-math.inf] * 4)
    model.train()
    assert torch.equal(model(x), big.base_model(x))


@torch.no_grad()
def test_a_sample_out_at_the_first_head_never_runs_the_next_member(pair, x):
    small, big, model = pair
    calls = []
    big.base_model.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    model.set_thresholds([-math.inf, math.inf, math.inf, math.inf])  # everyone leaves at member 0's head
    out = model(x, return_exits=True)
    assert calls == []
    assert out.exits.tolist() == [0] * BATCH
    assert torch.equal(out.logits, small(resize(x, SMALL)))
    threshold = small(resize(x, SMALL)).softmax(1).amax(1).median().item()
    model.set_thresholds([threshold, math.inf, math.inf, math.inf])
    out = model(x, return_exits=True)
    assert calls == [int((out.exits == 4).sum())]  # member 1 ran once, on those that did not leave
    assert 0 < calls[0] < BATCH


@torch.no_grad()
def test_mixed_exits_come_back_in_input_order_as_each_member_answers_them(pair, x):
    small, big, model = pair
    model.set_thresholds(quantile_thresholds(model, x, 0.6))
    out = model(x, return_exits=True)
    assert set(out.exits.tolist()) >= {0, 4} and len(set(out.exits.tolist())) >= 3
    first = out.exits == 0
    assert torch.allclose(out.logits[first], small(resize(x, SMALL))[first], atol=1e-5)
    share = timm_dgate.ExitPolicy(model.thresholds[1:], big.config.exit_score)  # member 1's gates: its share
    rest = big(x[~first], return_exits=True, profile=share)  # on what member 0 passed on
    assert torch.equal(out.exits[~first], rest.exits + 1)
    assert torch.allclose(out.logits[~first], rest.logits, atol=1e-5)

    perm = torch.randperm(BATCH, generator=torch.Generator().manual_seed(2))
    permuted = model(x[perm], return_exits=True)
    assert torch.equal(permuted.exits, out.exits[perm])
    assert torch.allclose(permuted.logits, out.logits[perm], atol=1e-5)


@torch.no_grad()
def test_each_member_reads_the_batch_at_its_own_input_size(pair, x):
    small, big, model = pair
    shapes = []
    for member in (small, big.base_model):
        member.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape)))
    model.set_thresholds([1.1, math.inf, math.inf, math.inf])  # member 0 runs, nobody is that sure: all go on
    assert model(resize(x, (1, 48, 48))).shape == (BATCH, 10)
    assert shapes == [(BATCH, *SMALL), (BATCH, 1, SIZE, SIZE)]
    assert model.input_sizes == [SMALL, (1, SIZE, SIZE)]
    with pytest.raises(ValueError, match="3 channels; the member takes 1"):
        model(x.expand(-1, 3, -1, -1))


def test_costs_price_a_head_as_its_whole_member_and_closed_members_as_nothing(pair):
    *_, model = pair
    costs = model.costs
    small_cost, big_costs = costs.members[0].backbone, costs.members[1]
    assert costs.backbone == big_costs.backbone and costs.num_gates == model.num_gates
    everything = costs.exit_costs([True, False, False, False]).tolist()  # member 0's head open, big's gates closed
    assert everything[0] == small_cost
    assert everything[-1] == small_cost + big_costs.backbone
    skipped = costs.exit_costs([False, True, False, False]).tolist()  # member 0 closed: it never runs
    assert skipped[1] == big_costs.to_gate[0] + big_costs.gate[0]
    assert skipped[-1] == big_costs.backbone + big_costs.gate[0]


def test_fit_calibrate_profile_and_evaluate_on_real_data(fmnist, trained_backbone):
    """A trained tiny model read at 16 px, then the same weights at 32 px with gates: one search over every exit."""
    small = timm.create_model(f"local-dir:{trained_backbone}", pretrained=True).eval()
    big = timm_dgate.wrap(timm.create_model(f"local-dir:{trained_backbone}", pretrained=True).eval(),
                          input_size=(1, SIZE, SIZE))  # fmt: skip
    model = timm_dgate.cascade([small, big], input_sizes=[SMALL, None])
    reports = model.fit(batches(fmnist.train), epochs=30, progress=False)
    assert reports[0] is None and len(reports[1].train_accuracy) == big.num_gates
    val, test = batches(fmnist.val), batches(fmnist.test)[:2]
    with pytest.raises(ValueError, match="the gates were fit on"):
        model.calibrate(batches(fmnist.train), max_drop=0.02)

    profile = model.calibrate(val, max_drop=0.02, name="drop-2pt")
    assert model.active_profile == "drop-2pt" and len(profile.thresholds) == model.num_gates
    assert profile.val_accuracy >= profile.val_plain_accuracy - 0.02
    assert profile.opened() and profile.val_gflops < model.costs.backbone / 1e9
    # the real early-exit forward gives what the search saw
    hits, flops, n = 0, 0.0, 0
    with torch.no_grad():
        for images, labels in val:
            out = model(images, return_exits=True)
            hits += (out.logits.argmax(1) == labels).sum().item()
            flops += model.costs.average(out.exits, model.thresholds) * len(labels)
            n += len(labels)
    assert hits / n == pytest.approx(profile.val_accuracy, abs=1e-9)
    assert flops / n / 1e9 == pytest.approx(profile.val_gflops, rel=1e-6)

    model.close_gates()
    model.use_profile("drop-2pt")
    report = timm_dgate.evaluate(model, test, timing_images=32, repeats=1, progress=False)
    assert [p.name for p in report.profiles] == ["drop-2pt"]
    assert report.plain_gflops == model.costs.backbone / 1e9
    assert sum(report.profiles[0].exit_fractions) == pytest.approx(1.0)
    assert model.active_profile == "drop-2pt"
    with pytest.raises(ValueError, match="evaluate"):
        model.calibrate(test, max_drop=0.02)


@torch.no_grad()
def test_save_and_from_pretrained_round_trip_and_members_load_with_plain_timm(pair, x, tmp_path):
    small, big, model = pair
    model.add_profile(Profile("eager", quantile_thresholds(model, x, 0.6), exit_score="softmax"), activate=True)
    expected = model(x, return_exits=True)
    folder = model.save_pretrained(tmp_path / "cascade")
    loaded = timm_dgate.from_pretrained(folder)
    assert isinstance(loaded, timm_dgate.Cascade) and loaded.active_profile == "eager"
    assert loaded.thresholds == model.thresholds and loaded.input_sizes == model.input_sizes
    out = loaded(x, return_exits=True)
    assert torch.equal(out.exits, expected.exits) and torch.allclose(out.logits, expected.logits, atol=1e-6)
    for name, member in (("member0", small), ("member1", big.base_model)):
        plain = timm.create_model(f"local-dir:{folder / name}", pretrained=True).eval()
        images = x if name == "member1" else resize(x, SMALL)
        assert torch.equal(plain(images), member(images))
    assert isinstance(timm_dgate.from_pretrained(folder / "member1"), timm_dgate.GatedModel)


@torch.no_grad()
def test_load_by_hub_id_with_member_folders_then_a_revision_and_offline(pair, x, tmp_path, fake_hub, monkeypatch):
    """The saved folder served as a Hub repo (tests/hub_server.py), its member folders fetched by snapshot_download."""
    _small, _big, model = pair
    model.add_profile(Profile("late", [math.inf, *quantile_thresholds(model, x, 0.5)[1:]], exit_score="softmax"))
    model.add_profile(Profile("eager", quantile_thresholds(model, x, 0.6), exit_score="softmax"), activate=True)
    expected = model(x, return_exits=True)
    assert len(set(expected.exits.tolist())) >= 3  # samples leave at both members' exits
    fake_hub.add("org/cascade", model.save_pretrained(tmp_path / "cascade"))

    def assert_same_cascade(loaded: timm_dgate.Cascade) -> None:
        assert isinstance(loaded, timm_dgate.Cascade) and not loaded.training
        assert loaded.active_profile == "eager" and loaded.thresholds == model.thresholds
        assert loaded.profiles == model.profiles and loaded.exit_score == model.exit_score
        assert loaded.exit_names == model.exit_names and loaded.input_sizes == model.input_sizes
        for theirs, ours in zip(loaded.members, model.members, strict=True):
            assert theirs.num_gates == ours.num_gates
            state, ours_state = theirs.state_dict(), ours.state_dict()
            assert state.keys() == ours_state.keys() and all(torch.equal(state[k], ours_state[k]) for k in state)
        out = loaded(x, return_exits=True)
        assert torch.equal(out.exits, expected.exits) and torch.allclose(out.logits, expected.logits, atol=1e-6)

    assert_same_cascade(timm_dgate.from_pretrained("org/cascade"))
    commit = fake_hub.commit("org/cascade")
    assert any(r.startswith(f"GET /api/models/org/cascade/tree/{commit}") for r in fake_hub.requests)
    for file in ("cascade_config.json", "member0/model.safetensors", "member1/gates.safetensors"):
        assert f"GET /org/cascade/resolve/{commit}/{file}" in fake_hub.requests, file
    assert not any(r.endswith("/README.md") for r in fake_hub.requests), "model cards are not needed to load"

    model.use_profile("late")  # a second revision whose active profile differs
    fake_hub.add("org/cascade", model.save_pretrained(tmp_path / "v2"), revision="v2")
    assert timm_dgate.from_pretrained("org/cascade", revision="v2").active_profile == "late"
    model.use_profile("eager")

    served = len(fake_hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_same_cascade(timm_dgate.from_pretrained("org/cascade"))
    assert len(fake_hub.requests) == served, "offline loading must not touch the network"


def test_push_to_hub_commits_manifest_and_member_folders(pair, intercepted_hub):
    *_, model = pair
    model.push_to_hub("org/cascade")
    files = intercepted_hub.files
    assert {"cascade_config.json", "profiles.json", "README.md"} <= set(files)
    for name in ("member0", "member1"):
        assert {f"{name}/config.json", f"{name}/model.safetensors", f"{name}/dgate_config.json"} <= set(files)
    assert json.loads(files["cascade_config.json"])["format_version"] == 1


def test_refusals_say_what_is_wrong(pair, x, tmp_path):
    _small, big, model = pair
    with pytest.raises(ValueError, match="at least two members"):
        timm_dgate.cascade([])
    with pytest.raises(ValueError, match="at least two members"):
        timm_dgate.cascade([big])
    with pytest.raises(TypeError, match="list of models"):
        timm_dgate.cascade(big)
    other = timm.create_model("test_resnet", in_chans=1, num_classes=7).eval()
    with pytest.raises(ValueError, match=r"same classes; their num_classes are \[7, 10\]"):
        timm_dgate.cascade([other, big], input_sizes=[SMALL, None])
    rgb = timm.create_model("test_resnet", num_classes=10).eval()
    with pytest.raises(ValueError, match="same input channels"):
        timm_dgate.cascade([rgb, big])
    with pytest.raises(ValueError, match="twice"):
        timm_dgate.cascade([big, big])
    with pytest.raises(ValueError, match="expected 4 thresholds"):
        model.set_thresholds([0.5])
    with pytest.raises(ValueError, match="has 1 thresholds; this cascade has 4"):
        model.add_profile(Profile("short", (0.5,)))
    with pytest.raises(ValueError, match="one validation cache per member"):
        model.calibrate(model.cache_features([(x, torch.zeros(BATCH, dtype=torch.long))], "v", progress=False)[0],
                        max_drop=0.01)  # fmt: skip
    model.set_thresholds([0.0, math.inf, math.inf, math.inf])
    with pytest.raises(RuntimeError, match="cannot capture"):
        torch.jit.trace(model, x)
    folder = model.save_pretrained(tmp_path / "c")
    manifest = json.loads((folder / "cascade_config.json").read_text())
    (folder / "cascade_config.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(HubFormatError, match="format version 99, newer"):
        timm_dgate.from_pretrained(folder)
    (folder / "cascade_config.json").write_text(json.dumps({**manifest, "thresholds": [0.5]}))
    with pytest.raises(HubFormatError, match="thresholds"):
        timm_dgate.from_pretrained(folder)


def test_cli_fits_a_cascade_then_evaluates_its_folder(tmp_path, image_folder, checkpoint, capsys):  # noqa: F811
    """``timm-dgate fit --cascade a,b`` (the recipe) then ``timm-dgate eval`` on the folder it wrote."""
    out = tmp_path / "run"
    model = ["--in-chans", "1", "--num-classes", "10", "--input-size", "1", "32", "32"]
    data = ["--data-dir", str(image_folder), "--val-fraction", "0.25", "-j", "0", "-b", "64"]
    argv = ["fit", "--cascade", "test_resnet,test_resnet", "--cascade-checkpoints", f"{checkpoint},{checkpoint}",
            *model, *data, "--test-split", "validation", "--max-drop", "1", "--gate-kind", "ce",
            "--gate-epochs", "20", "--timing-images", "32", "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    loaded = timm_dgate.from_pretrained(out / "hub")
    assert isinstance(loaded, timm_dgate.Cascade) and list(loaded.profiles) == ["drop-1pt"]
    assert [m.num_gates for m in loaded.members] == [0, 3]  # --cascade-gates last: only the big member is gated
    results = json.loads((out / "results.json").read_text())
    assert results["exits"] == loaded.exit_names and results["test"]["profiles"][0]["name"] == "drop-1pt"
    capsys.readouterr()
    assert cli.main(["eval", str(out / "hub"), *data, "--test-split", "validation", "--timing-images", "32"]) == 0
    assert "drop-1pt" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["fit", "--cascade", "test_resnet", *model, *data])  # one member is no cascade
    assert "two or more" in capsys.readouterr().err
