"""Folders are written whole and checked whole (issue 26, section 3).

A save or export writes into a hidden sibling and swaps it in, so a failure at any point leaves
the old folder byte for byte; a save never leaves an earlier save's files behind and never
deletes a file that is not its own; loading refuses a manifest or config field it cannot rely
on with an error naming the file and the field.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import timm
import torch

import timm_dgate
from timm_dgate import ExportError, HubFormatError
from timm_dgate.deploy.runtime import ExportedGatedModel
from timm_dgate.hub import folder as hub_folder

from .helpers import SIZE, tiny_gated


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_leftovers(parent: Path) -> bool:
    """No hidden temporary sibling was left next to the target."""
    return not [p.name for p in parent.iterdir() if p.name.startswith(".")]


def fail(*args: object, **kwargs: object) -> None:
    raise RuntimeError("disk full")


def small_gated(seed: int) -> timm_dgate.GatedModel:
    """One gate, so an export is two segment files."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=10).eval()
    gated = timm_dgate.wrap(model, input_size=(1, SIZE, SIZE), gates=[1])
    gated.add_profile(timm_dgate.Profile("open", (0.5,)), activate=True)
    return gated


# ---- gated folders ------------------------------------------------------------------------------


def test_a_save_that_fails_midway_leaves_the_old_folder_byte_identical(tmp_path, monkeypatch):
    folder = tmp_path / "gated"
    tiny_gated(seed=0).save_pretrained(folder)
    before = contents(folder)
    monkeypatch.setattr(hub_folder, "write_profiles", fail)  # after the backbone and the gates were written
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_gated(seed=1).save_pretrained(folder)
    assert contents(folder) == before and no_leftovers(tmp_path)
    timm_dgate.from_pretrained(folder)


def test_a_gates_only_save_over_a_folder_with_a_backbone_leaves_no_backbone_files(tmp_path):
    gated = tiny_gated()
    gated.save_pretrained(tmp_path)  # an existing empty folder (pytest's) is replaced like a missing one
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    gated.save_pretrained(tmp_path, base_model="timm/test_resnet.r160_in1k")
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "config.json").exists()
    config = json.loads((tmp_path / "dgate_config.json").read_text())
    assert config["backbone"] == {**config["backbone"], "source": "hub", "hub_id": "timm/test_resnet.r160_in1k"}


def test_a_tradeoff_plot_already_in_the_folder_is_kept_when_none_is_given(tmp_path):
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    folder = tiny_gated().save_pretrained(tmp_path / "saved", tradeoff_plot=plot)
    tiny_gated(seed=1).save_pretrained(folder)
    assert (folder / "tradeoff.png").read_bytes() == plot.read_bytes()
    assert "(tradeoff.png)" in (folder / "README.md").read_text()


def test_a_folder_with_files_that_are_not_ours_is_refused_and_nothing_is_deleted(tmp_path):
    gated = tiny_gated()
    gated.save_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "runs").mkdir()
    before = contents(tmp_path)
    with pytest.raises(HubFormatError, match=r"holds files that are not part of a gated model's folder.*notes\.txt"):
        gated.save_pretrained(tmp_path, base_model="timm/test_resnet.r160_in1k")
    with pytest.raises(ExportError, match=r"not part of an export \(.*dgate_config\.json"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every gate is closed: export warns before it looks at the folder
        timm_dgate.export(gated, tmp_path)
    assert contents(tmp_path) == before and (tmp_path / "runs").is_dir()


# ---- cascades -----------------------------------------------------------------------------------


def tiny_cascade(seed: int) -> timm_dgate.Cascade:
    torch.manual_seed(seed)
    small = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    return timm_dgate.cascade([small, tiny_gated(seed)], input_sizes=[(1, 16, 16), None])


def test_a_cascade_save_that_fails_at_member_1_leaves_the_old_cascade_folder_whole(tmp_path):
    folder = tmp_path / "cascade"
    tiny_cascade(seed=0).save_pretrained(folder)
    before = contents(folder)
    other = tiny_cascade(seed=1)
    other.members[1].save_pretrained = fail
    with pytest.raises(RuntimeError, match="disk full"):
        other.save_pretrained(folder)
    assert contents(folder) == before and no_leftovers(tmp_path)
    assert isinstance(timm_dgate.from_pretrained(folder), timm_dgate.Cascade)


def test_a_cascade_saved_over_a_cascade_with_more_members_keeps_none_of_them(tmp_path):
    torch.manual_seed(0)
    plain = [timm.create_model("test_resnet", in_chans=1, num_classes=10).eval() for _ in range(2)]
    timm_dgate.cascade([*plain, tiny_gated()]).save_pretrained(tmp_path)
    assert (tmp_path / "member2").is_dir()
    tiny_cascade(seed=0).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["member0", "member1"]
    assert len(timm_dgate.from_pretrained(tmp_path).members) == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [("input_size", [1, 8, 8]), ("architecture", "resnet50")],
)
def test_a_cascade_manifest_that_disagrees_with_its_members_is_refused(tmp_path, field, value):
    folder = tiny_cascade(seed=0).save_pretrained(tmp_path / "c")
    path = folder / "cascade_config.json"
    manifest = json.loads(path.read_text())
    manifest["members"][0][field] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(HubFormatError, match=rf"cascade_config\.json: member member0 is listed with {field}"):
        timm_dgate.from_pretrained(folder)


# ---- exports ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_export(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    timm_dgate.export(small_gated(seed=0), folder, format="torch")
    return folder


def test_a_bf16_export_that_fails_leaves_the_old_export_loadable_and_unchanged(tmp_path, torch_export):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "export"
    shutil.copytree(torch_export, folder)
    before = contents(folder)
    half = small_gated(seed=1).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ExportError, match=r"segment_0\.onnx could not be run.*nothing was written"):
            timm_dgate.export(half, folder, format="onnx")
    assert contents(folder) == before and no_leftovers(tmp_path)
    x = torch.randn(4, 1, SIZE, SIZE)
    assert ExportedGatedModel(folder)(x).shape == (4, 10)


def edit_manifest(source: Path, folder: Path, **changes: object) -> Path:
    shutil.copytree(source, folder)
    path = folder / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dtype": "float33"}, r"dtype must be a torch dtype's name, got 'float33'"),
        ({"format": "onnx"}, r"segments must be \['segment_0\.onnx', 'segment_1\.onnx'\]"),
        ({"segments": ["segment_1.pt2", "segment_0.pt2"]}, r"segments must be .* got \['segment_1"),
        ({"input_size": [1, SIZE]}, r"input_size must be three positive ints"),
        ({"input_size": [1, 0, SIZE]}, r"input_size must be three positive ints"),
        ({"input_size": [1, "32", SIZE]}, r"input_size must be three positive ints"),
        ({"num_classes": 0}, r"num_classes must be a positive integer"),
        ({"exit_score": "vibes"}, r"exit_score must be one of"),
        ({"active_profile": "fast"}, r"active_profile 'fast' is not among its profiles \['open'\]"),
    ],
)
def test_a_manifest_field_the_runtime_cannot_rely_on_is_refused_by_name(tmp_path, torch_export, changes, message):
    folder = edit_manifest(torch_export, tmp_path / "export", **changes)
    with pytest.raises(ExportError, match=r"manifest\.json: " + message):
        ExportedGatedModel(folder)


def test_segment_files_of_another_format_than_the_manifest_says_are_refused(tmp_path, torch_export):
    folder = edit_manifest(torch_export, tmp_path / "export", format="onnx", segments=["segment_0.onnx",
                                                                                       "segment_1.onnx"])
    for name in ("segment_0", "segment_1"):
        (folder / f"{name}.pt2").rename(folder / f"{name}.onnx")
    with pytest.raises(ExportError, match=r"segment_0\.onnx is not a 'onnx' file, as the format in .*manifest\.json"):
        ExportedGatedModel(folder)


def test_saving_into_the_working_directory_is_refused_not_swapped_away(tmp_path, monkeypatch):
    """A whole-folder swap of the working directory would leave the process in a deleted folder."""
    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    with pytest.raises(HubFormatError, match="working directory"):
        tiny_gated().save_pretrained(".")
    assert Path.cwd() == folder and list(folder.iterdir()) == []
