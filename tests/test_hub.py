"""Hub I/O: save/load round trips, loading by Hub id, push_to_hub's commit, and refusals of bad folders.

There is no network here. Loading by Hub id runs huggingface_hub's real download code against a
small local stand-in for the Hub (``FakeHub``: http.server on 127.0.0.1 serving the endpoints the
client calls); pushing is checked at huggingface_hub's commit call, which is intercepted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from torch import nn

import timm_dgate
from timm_dgate import HubFormatError
from timm_dgate.core.config import FORMAT_VERSION
from timm_dgate.hub.backbone import backbone_args

from .helpers import hooks

SIZE = 64
BATCH = 24


# ---- models with gates that really open -------------------------------------------------------


def make_gated(kind: str, seed: int = 0, model: nn.Module | None = None) -> tuple[timm_dgate.GatedModel, torch.Tensor]:
    """A tiny timm model with random-init gates and hand-made profiles whose thresholds let samples exit."""
    torch.manual_seed(seed)
    if kind == "cnn":
        model = model or timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
        gated = timm_dgate.wrap(model, input_size=(1, SIZE, SIZE))
    else:
        model = model or timm.create_model("test_vit", img_size=SIZE, num_classes=7).eval()
        gated = timm_dgate.wrap(model, input_size=(3, SIZE, SIZE), pool="token", model_args={"drop_path_rate": 0.0})
    for gate in gated.gates:
        nn.init.normal_(gate.fc.weight)
        nn.init.normal_(gate.fc.bias)
    x = torch.randn(BATCH, *gated.input_size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        margins, _ = gated.forward_gates(x)
    margin = [m.amax(1) for m in margins]
    softmax = [m.softmax(1).amax(1) for m in margins]
    gated.add_profile(
        timm_dgate.Profile(
            name="eager",
            thresholds=[s.quantile(0.4).item() for s in margin],
            val_accuracy=0.91,
            val_gflops=0.012,
            val_plain_accuracy=0.93,
            exit_fractions=(0.6, 0.2, 0.1, 0.1),
            test={"accuracy": 0.905, "gflops": 0.0121},
        )
    )
    gated.add_profile(
        timm_dgate.Profile(
            name="careful",
            thresholds=[math.inf, *[s.quantile(0.7).item() for s in softmax[1:]]],
            exit_score="softmax",
            target="max_drop=0.005",
        )
    )
    gated.add_profile(timm_dgate.Profile(name="closed", thresholds=[math.inf] * gated.num_gates))
    gated.use_profile("eager")
    gated.config = gated.config.replace(gate_loss="ce")  # as if fit(loss="ce") had trained them
    return gated, x


def run_profiles(gated: timm_dgate.GatedModel, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    with torch.no_grad():
        for name in gated.profiles:
            gated.use_profile(name)
            result = gated(x, return_exits=True)
            out[name] = (result.logits, result.exits)
    return out


def assert_same_model(saved: timm_dgate.GatedModel, loaded: timm_dgate.GatedModel, x: torch.Tensor) -> None:
    assert loaded.active_profile == saved.active_profile
    assert loaded.thresholds == saved.thresholds and loaded.exit_score == saved.exit_score
    assert loaded.gate_loss == saved.gate_loss
    assert [b.module for b in loaded.boundaries] == [b.module for b in saved.boundaries]
    assert loaded.profiles == saved.profiles  # every field, thresholds and metrics included
    want, got = saved.gates.state_dict(), loaded.gates.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    active = saved.active_profile
    expected, actual = run_profiles(saved, x), run_profiles(loaded, x)
    saved.use_profile(active)
    loaded.use_profile(active)
    for name, (logits, exits) in expected.items():
        assert torch.equal(actual[name][0], logits), name
        assert torch.equal(actual[name][1], exits), name
    assert (expected["eager"][1] < saved.num_gates).any(), "the test needs samples that exit at a gate"
    assert (expected["closed"][1] == saved.num_gates).all()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and stays fast when other work shares the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch):
    """Weights load only through safetensors: any torch.load during a test fails it."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called; timm_dgate must load weights only through safetensors")

    monkeypatch.setattr(torch, "load", refuse)


# ---- save and load a folder ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_save_then_load_gives_the_same_model(tmp_path, kind):
    gated, x = make_gated(kind)
    folder = gated.save_pretrained(tmp_path / "saved")
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "README.md",
        "dgate_config.json",
        "gates.safetensors",
        "profiles.json",
        "config.json",
        "model.safetensors",
    }
    assert set(load_file(folder / "gates.safetensors")) == {f"gates.{k}" for k in gated.gates.state_dict()}

    loaded = timm_dgate.from_pretrained(folder)
    assert not loaded.training
    assert_same_model(gated, loaded, x)
    assert loaded.config.model_args == json.loads(json.dumps(backbone_args(gated.base_model, gated.config.model_args)))

    # the backbone folder is timm's own: the plain model loads with timm alone
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(plain(x), gated.base_model(x))

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm_dgate"
    assert {"timm", "image-classification", "early-exit", "decision-gates"} <= set(card.data.tags)
    assert "| `eager` | margin |" in card.text and "| `careful` | softmax | inf," in card.text
    assert "91.00%" in card.text and "tradeoff.png" not in card.text


def test_model_args_and_gate_loss_are_recorded(tmp_path):
    gated, _ = make_gated("vit")
    gated.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "dgate_config.json").read_text())
    assert config["format_version"] == 1 and config["library_version"] == timm_dgate.__version__
    assert config["architecture"] == "test_vit" and config["num_classes"] == 7
    assert config["input_size"] == [3, SIZE, SIZE] and config["pool"] == "token"
    assert config["gate_loss"] == "ce" and config["exit_score"] == "margin"
    assert config["backbone"]["source"] == "folder" and config["backbone"]["hub_id"] is None
    args = config["backbone"]["model_args"]
    assert args["img_size"] == [SIZE, SIZE] and args["num_classes"] == 7 and args["drop_path_rate"] == 0.0
    assert [g["module"] for g in config["gates"]] == [b.module for b in gated.boundaries]
    profiles = json.loads((tmp_path / "profiles.json").read_text())["profiles"]
    assert [p["name"] for p in profiles] == ["eager", "careful", "closed"]
    assert profiles[2]["thresholds"] == ["inf"] * 3


def test_model_args_that_contradict_the_model_or_are_not_json_are_refused(tmp_path):
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    gated = timm_dgate.wrap(model, input_size=(1, SIZE, SIZE), model_args={"num_classes": 5})
    with pytest.raises(ValueError, match="num_classes=5 disagrees"):
        gated.save_pretrained(tmp_path)
    gated.config = gated.config.replace(model_args={"act_layer": nn.ReLU})
    with pytest.raises(HubFormatError, match=r"argument act_layer=.* cannot be saved as JSON"):
        gated.save_pretrained(tmp_path)


def test_profile_argument_and_tradeoff_plot(tmp_path):
    gated, _ = make_gated("cnn")
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    folder = gated.save_pretrained(tmp_path / "saved", tradeoff_plot=plot)
    assert (folder / "tradeoff.png").read_bytes() == plot.read_bytes()
    assert "![accuracy against GFLOPs per image](tradeoff.png)" in (folder / "README.md").read_text()
    loaded = timm_dgate.from_pretrained(folder, profile="careful")
    assert loaded.active_profile == "careful" and loaded.exit_score == "softmax"
    assert loaded.thresholds == gated.profiles["careful"].thresholds


def test_model_card_states_how_images_are_preprocessed(tmp_path):
    """The stored backbone's data config, as timm will read it from config.json (not timm's defaults)."""
    gated, _ = make_gated("cnn")
    cfg = {"input_size": (1, SIZE, SIZE), "mean": (0.25,), "std": (0.5,), "interpolation": "bilinear", "crop_pct": 1.0}
    gated.base_model.pretrained_cfg = {**gated.base_model.pretrained_cfg, **cfg}
    card = (gated.save_pretrained(tmp_path) / "README.md").read_text()
    stated = "input 1x64x64, mean 0.25, std 0.5, interpolation bilinear, crop_pct 1.0 (crop_mode center)"
    assert "## Preprocessing" in card and stated in card
    assert "timm.data.create_transform(**data_config)" in card


def test_attach_to_an_existing_model(tmp_path):
    gated, x = make_gated("cnn")
    gated.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # not needed when the backbone is given
    backbone = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    backbone.load_state_dict(gated.base_model.state_dict())
    loaded = timm_dgate.from_pretrained(tmp_path, model=backbone)
    assert loaded.base_model is backbone
    assert_same_model(gated, loaded, x)


# ---- loading by Hub id, through huggingface_hub's download code ------------------------------------


def test_load_by_hub_id_then_offline_from_the_cache(tmp_path, fake_hub, monkeypatch):
    """Loads through snapshot_download from a local stand-in for the Hub (no network here), then offline."""
    gated, x = make_gated("cnn")
    fake_hub.add("org/resnet-dgate", gated.save_pretrained(tmp_path / "repo"))

    loaded = timm_dgate.from_pretrained("org/resnet-dgate")
    assert_same_model(gated, loaded, x)
    for endpoint in ("GET /api/models/org/resnet-dgate/revision/main", "GET /api/models/org/resnet-dgate/tree/"):
        assert any(r.startswith(endpoint) for r in fake_hub.requests), endpoint
    for method in ("HEAD", "GET"):
        assert f"{method} /org/resnet-dgate/resolve/{fake_hub.commit('org/resnet-dgate')}/gates.safetensors" in (
            fake_hub.requests
        )
    assert not any("README.md" in r for r in fake_hub.requests), "the card is not needed to load"

    plain = timm.create_model("hf-hub:org/resnet-dgate", pretrained=True).eval()  # timm alone, same repo
    with torch.no_grad():
        assert torch.equal(plain(x), gated.base_model(x))

    served = len(fake_hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = timm_dgate.from_pretrained("org/resnet-dgate")
    assert len(fake_hub.requests) == served, "offline loading must not touch the network"
    assert_same_model(gated, offline, x)
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        timm_dgate.from_pretrained("org/never-downloaded")


def test_gates_only_repo_names_its_base_model(tmp_path, fake_hub, monkeypatch):
    """A gates-only repo (like a PEFT adapter) loads its backbone from the base repo it names; both on the stand-in."""
    base = timm.create_model("test_vit", img_size=SIZE, num_classes=7).eval()
    save_for_hf(base, str(tmp_path / "base"), safe_serialization=True)
    fake_hub.add("timm/test_vit.base", tmp_path / "base")
    backbone = timm.create_model("hf-hub:timm/test_vit.base", pretrained=True).eval()
    gated, x = make_gated("vit", model=backbone)

    folder = gated.save_pretrained(tmp_path / "gates", base_model="hf-hub:timm/test_vit.base")
    assert {p.name for p in folder.iterdir()} == {
        "README.md",
        "dgate_config.json",
        "gates.safetensors",
        "profiles.json",
    }
    config = json.loads((folder / "dgate_config.json").read_text())
    assert config["backbone"]["source"] == "hub" and config["backbone"]["hub_id"] == "timm/test_vit.base"
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "timm/test_vit.base"
    assert "As the base model's own `pretrained_cfg` says (`timm/test_vit.base`)" in card.text
    fake_hub.add("org/vit-gates", folder)

    loaded = timm_dgate.from_pretrained("org/vit-gates")
    assert_same_model(gated, loaded, x)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_same_model(gated, timm_dgate.from_pretrained("org/vit-gates"), x)


def test_refuses_a_base_model_whose_head_does_not_match(tmp_path, fake_hub):
    """Gates of a 5-class model saved as gates-only over a 7-class base: timm would re-initialise the head."""
    base = timm.create_model("test_vit", img_size=SIZE, num_classes=7).eval()
    save_for_hf(base, str(tmp_path / "base"), safe_serialization=True)
    fake_hub.add("timm/test_vit.base", tmp_path / "base")
    gated, _ = make_gated("vit", model=timm.create_model("test_vit", img_size=SIZE, num_classes=5).eval())
    fake_hub.add("org/vit-gates", gated.save_pretrained(tmp_path / "gates", base_model="timm/test_vit.base"))
    with pytest.raises(HubFormatError, match="has 7 classes but the gates were saved for a 5-class model"):
        timm_dgate.from_pretrained("org/vit-gates")


def test_revision_selects_what_is_loaded(tmp_path, fake_hub):
    gated, _ = make_gated("cnn")
    fake_hub.add("org/resnet-dgate", gated.save_pretrained(tmp_path / "main"))
    gated.add_profile(timm_dgate.Profile(name="added", thresholds=gated.profiles["eager"].thresholds))
    fake_hub.add("org/resnet-dgate", gated.save_pretrained(tmp_path / "v2"), revision="v2")
    assert "added" not in timm_dgate.from_pretrained("org/resnet-dgate").profiles
    assert "added" in timm_dgate.from_pretrained("org/resnet-dgate", revision="v2").profiles
    assert any("/revision/v2" in r for r in fake_hub.requests)


# ---- push_to_hub: what would be committed ----------------------------------------------------------


def test_push_to_hub_commits_the_saved_folder(tmp_path, intercepted_hub):
    gated, x = make_gated("cnn")
    info = gated.push_to_hub(
        "org/resnet-dgate", private=True, revision="dev", commit_message="gates v1", token="hf_test"
    )
    calls = intercepted_hub
    assert info.commit_url.startswith("https://hub/org/resnet-dgate")
    assert calls.repo == dict(repo_id="org/resnet-dgate", token="hf_test", private=True, exist_ok=True)
    assert calls.branch == dict(repo_id="org/resnet-dgate", branch="dev", exist_ok=True)
    assert calls.commit["commit_message"] == "gates v1" and calls.commit["revision"] == "dev"
    assert calls.commit["token"] == "hf_test" and calls.commit["create_pr"] is False

    local = gated.save_pretrained(tmp_path / "local")
    assert set(calls.files) == {p.name for p in local.iterdir()}
    for name in ("dgate_config.json", "profiles.json", "gates.safetensors", "config.json", "model.safetensors"):
        assert calls.files[name] == (local / name).read_bytes(), name
    card = calls.files["README.md"].decode()
    assert 'timm_dgate.from_pretrained("org/resnet-dgate")' in card
    assert 'timm.create_model("hf-hub:org/resnet-dgate", pretrained=True)' in card

    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, data in calls.files.items():
        (pushed / name).write_bytes(data)
    assert_same_model(gated, timm_dgate.from_pretrained(pushed), x)


def test_push_gates_only(tmp_path, intercepted_hub):
    gated, _ = make_gated("cnn")
    plot = tmp_path / "tradeoff.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\nplot")
    gated.push_to_hub("org/gates", base_model="timm/test_resnet.r160_in1k", tradeoff_plot=plot)
    calls = intercepted_hub
    assert calls.branch is None and calls.commit["revision"] is None
    assert calls.repo["private"] is None and calls.repo["token"] is None  # huggingface_hub's defaults
    assert set(calls.files) == {"README.md", "dgate_config.json", "gates.safetensors", "profiles.json", "tradeoff.png"}
    card = calls.files["README.md"].decode()
    assert "base_model: timm/test_resnet.r160_in1k" in card and "](tradeoff.png)" in card


# ---- bad input: clear errors, nothing half-loaded ------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    gated, _ = make_gated("cnn")
    return gated.save_pretrained(tmp_path / "saved")


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_refuses_another_architecture(saved):
    model = timm.create_model("test_vit", img_size=SIZE, num_classes=10).eval()
    with pytest.raises(HubFormatError, match="saved for architecture 'test_resnet'; the model is 'test_vit'"):
        timm_dgate.from_pretrained(saved, model=model)
    assert hooks(model) == 0


def test_refuses_another_number_of_classes(saved):
    model = timm.create_model("test_resnet", in_chans=1, num_classes=5).eval()
    with pytest.raises(HubFormatError, match="saved for 10 classes; the model has 5"):
        timm_dgate.from_pretrained(saved, model=model)
    model = timm.create_model("test_resnet", in_chans=3, num_classes=10).eval()
    with pytest.raises(HubFormatError, match="saved for 1 input channels; the model takes 3"):
        timm_dgate.from_pretrained(saved, model=model)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("dgate_config.json", "config file dgate_config.json is missing"),
        ("gates.safetensors", "gate weights file gates.safetensors is missing"),
        ("profiles.json", "threshold profiles file profiles.json is missing"),
        ("model.safetensors", "backbone's model.safetensors is missing"),
        ("config.json", "backbone's config.json is missing"),
    ],
)
def test_refuses_a_missing_file(saved, name, message):
    (saved / name).unlink()
    with pytest.raises(HubFormatError, match=message):
        timm_dgate.from_pretrained(saved)


def test_refuses_a_missing_folder(tmp_path):
    with pytest.raises(HubFormatError, match="is not a folder"):
        timm_dgate.from_pretrained(tmp_path / "nothing-here")


def test_refuses_a_newer_format_version(saved):
    newer = FORMAT_VERSION + 1
    edit_json(saved / "dgate_config.json", format_version=newer)
    with pytest.raises(HubFormatError, match=rf"format version {newer}, newer than this timm_dgate .* upgrade"):
        timm_dgate.from_pretrained(saved)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("dgate_config.json", "{not json", "dgate_config.json .* is not valid JSON"),
        ("dgate_config.json", '{"format_version": 1}', "dgate_config.json lacks architecture, num_classes"),
        ("dgate_config.json", "gates", "gates must be a list of objects with name, module, num_chs, layout"),
        ("profiles.json", '{"profiles": [{"name": "x"}]}', "profile 'x' needs a name and thresholds"),
        ("profiles.json", '{"profiles": [{"name": "x", "thresholds": [1, 2]}]}',
         "profile 'x': 2 thresholds for 3 gates"),
    ],
)
def test_refuses_a_bad_config_or_profiles_file(saved, name, text, message):
    if text == "gates":  # a valid config but for one gate entry
        config = json.loads((saved / name).read_text())
        del config["gates"][1]["num_chs"]
        text = json.dumps(config)
    (saved / name).write_text(text)
    with pytest.raises(HubFormatError, match=message):
        timm_dgate.from_pretrained(saved)


def test_refuses_an_unknown_profile(saved):
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    with pytest.raises(KeyError, match=r"unknown profile 'fast'.*it has: eager, careful, closed"):
        timm_dgate.from_pretrained(saved, model=model, profile="fast")
    assert hooks(model) == 0


@pytest.mark.parametrize("name", ["gates.safetensors", "model.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_refuses_a_corrupted_safetensors_file(saved, name, damage):
    path = saved / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x00\x01not safetensors at all")
    with pytest.raises(HubFormatError, match=f"{name} .* is not a valid safetensors file, corrupted or truncated"):
        timm_dgate.from_pretrained(saved)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop", r"missing keys \['gates.2.fc.bias'\], unexpected keys \[\]"),
        ("extra", r"missing keys \[\], unexpected keys \['gates.3.fc.weight'\]"),
        ("shape", r"gates.0.fc.weight has shape \(10, 31\), the config implies \(10, 32\)"),
    ],
)
def test_refuses_gate_weights_that_do_not_match(saved, change, message):
    tensors = load_file(saved / "gates.safetensors")
    if change == "drop":
        del tensors["gates.2.fc.bias"]
    elif change == "extra":
        tensors["gates.3.fc.weight"] = torch.zeros(10, 4)
    else:
        tensors["gates.0.fc.weight"] = torch.zeros(10, 31)
    save_file(tensors, saved / "gates.safetensors")
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    with pytest.raises(HubFormatError, match=message):
        timm_dgate.from_pretrained(saved, model=model)
    assert hooks(model) == 0


def test_a_failure_after_wrapping_leaves_the_model_unhooked(saved):
    """Config and weights agree with each other but not with the model: the hooks come off again."""
    config = json.loads((saved / "dgate_config.json").read_text())
    config["gates"][0]["num_chs"] = 31
    (saved / "dgate_config.json").write_text(json.dumps(config))
    tensors = load_file(saved / "gates.safetensors")
    tensors["gates.0.fc.weight"] = torch.zeros(10, 31)
    save_file(tensors, saved / "gates.safetensors")
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    with pytest.raises(HubFormatError, match=r"gate 0 .* was saved at 'layer1' with 31 channels"):
        timm_dgate.from_pretrained(saved, model=model)
    assert hooks(model) == 0


def test_refuses_a_gates_only_folder_without_a_base_model(tmp_path):
    gated, _ = make_gated("cnn")
    with pytest.raises(HubFormatError, match="gates-only folder must name its backbone"):
        gated.save_pretrained(tmp_path, include_backbone=False)


def test_unknown_fields_in_the_config_and_in_profiles_are_ignored(saved):
    """docs/hub.md promises forward compatibility: a newer writer's extra fields load."""
    edit_json(saved / "dgate_config.json", added_by_a_newer_version={"x": 1})
    profiles = json.loads((saved / "profiles.json").read_text())
    profiles["profiles"][0]["calibrated_with"] = "a newer search"
    (saved / "profiles.json").write_text(json.dumps(profiles))
    loaded = timm_dgate.from_pretrained(saved)
    assert loaded.active_profile == "eager" and len(loaded.profiles) == 3


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("dgate_config.json", {"thresholds": ["NaN", 1.0, 2.0]}, r"dgate_config.json: thresholds: .*NaN"),
        ("dgate_config.json", {"thresholds": [1.0]}, r"dgate_config.json: thresholds: 1 thresholds for 3 gates"),
        ("dgate_config.json", {"active_profile": "gone"}, r"dgate_config.json: active_profile 'gone' is not in"),
        ("profiles.json", {"thresholds": [float("nan"), 1.0, 2.0]}, r"profiles.json: profile 'eager': .*NaN"),
    ],
)
def test_bad_values_inside_files_are_hub_format_errors_naming_file_and_field(saved, name, change, message):
    if name == "profiles.json":
        data = json.loads((saved / name).read_text())
        data["profiles"][0].update(change)
        (saved / name).write_text(json.dumps(data))
    else:
        edit_json(saved / name, **change)
    with pytest.raises(HubFormatError, match=message):
        timm_dgate.from_pretrained(saved)
