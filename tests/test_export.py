"""``timm_dgate.export`` keeps the exits: the exported folder, run by ``deploy.runtime``, exits where eager does.

Both formats are exported once per module (the ONNX exporter takes about a second per file);
every test then runs batches in which samples leave at every gate and compares each sample's
exit and logits with the eager gated model.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import timm
import torch

import timm_dgate
from timm_dgate.deploy.runtime import ExportedGatedModel, OnnxGatedModel, TorchExportedGatedModel

from .helpers import SIZE
from .test_policy import hammer

QUANTILES = (0.7, 0.6, 0.5)  # of each gate's scores: about a third leave at each gate, the rest reach the head


def between_scores(scores: torch.Tensor, q: float) -> float:
    """A threshold halfway between two neighbouring scores: no sample sits within float error of it."""
    ranked = scores.sort().values
    i = int(q * (len(ranked) - 1))
    return float((ranked[i] + ranked[i + 1]) / 2)


def gated_with_mixed_exits() -> tuple[timm_dgate.GatedModel, torch.Tensor]:
    """A tiny gated model whose thresholds send some of ``images`` out at every gate and some to the head.

    Its gates are MLP gates, the default kind's (a linear gate is their last layer alone).
    """
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    gated = timm_dgate.wrap(backbone, input_size=(1, SIZE, SIZE), gate_hidden=16)
    for gate in gated.gates:
        torch.nn.init.normal_(gate.fc.weight)
    images = torch.randn(96, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        margins, _ = gated.forward_gates(images)
    mixed = [between_scores(m.amax(1), q) for m, q in zip(margins, QUANTILES)]
    gated.add_profile(timm_dgate.Profile("mixed", mixed))
    gated.add_profile(timm_dgate.Profile("first", (mixed[0], math.inf, math.inf)), activate=True)
    return gated, images


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The same gated model exported to ONNX (with profiles) and to torch (gates closed, no profile: it warns)."""
    gated, images = gated_with_mixed_exits()
    folders = {"onnx": tmp_path_factory.mktemp("onnx"), "torch": tmp_path_factory.mktemp("torch")}
    timm_dgate.export(gated, folders["onnx"], format="onnx")
    bare = timm_dgate.wrap(gated.base_model, input_size=gated.input_size, gate_head=gated.config.gate_head,
                           gate_head_options=gated.config.gate_head_options)
    bare.gates.load_state_dict(gated.gates.state_dict())
    with pytest.warns(UserWarning, match="never exits early"):
        timm_dgate.export(bare, folders["torch"], format="torch")
    return gated, images, folders


def assert_same_run(gated: timm_dgate.GatedModel, runtime: ExportedGatedModel, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        want = gated(images, return_exits=True)
    got = runtime(images, return_exits=True)
    assert torch.equal(got.exits, want.exits)
    assert torch.allclose(got.logits, want.logits, rtol=0, atol=1e-4)
    return got.exits


@pytest.mark.parametrize("runtime_class", [OnnxGatedModel, TorchExportedGatedModel], ids=["onnx", "torch"])
def test_exported_model_exits_where_eager_does_with_the_same_logits_in_input_order(exported, runtime_class):
    gated, images, folders = exported
    runtime = runtime_class(folders[runtime_class.format])
    gated.use_profile("mixed")
    runtime.set_thresholds(gated.thresholds, gated.exit_score)  # the torch export was written with closed gates
    exits = torch.cat([assert_same_run(gated, runtime, batch) for batch in images.split([1, 7, 88])])
    assert exits.bincount(minlength=4).min() > 0  # samples left at every gate and at the head
    gated.close_gates()
    runtime.close_gates()
    assert (assert_same_run(gated, runtime, images[:5]) == gated.num_gates).all()  # closed: the plain model


def test_onnx_export_carries_the_profiles_and_the_active_one(exported):
    gated, images, folders = exported
    runtime = OnnxGatedModel(folders["onnx"])
    assert set(runtime.profiles) == {"mixed", "first"} and runtime.active_profile == "first"
    gated.use_profile("first")
    assert set(assert_same_run(gated, runtime, images).tolist()) == {0, 3}  # gate 0 or the head
    runtime.use_profile("mixed")
    gated.use_profile("mixed")
    assert_same_run(gated, runtime, images)
    with pytest.raises(KeyError, match="unknown profile 'fast'"):
        runtime.use_profile("fast")
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 32, 32\)"):
        runtime(images[:, :, :16])


def test_a_folder_of_the_other_format_a_newer_format_or_a_missing_file_is_refused(exported, tmp_path):
    _, _, folders = exported
    with pytest.raises(timm_dgate.ExportError, match="holds a 'torch' export; OnnxGatedModel runs 'onnx'"):
        OnnxGatedModel(folders["torch"])
    folder = shutil.copytree(folders["onnx"], tmp_path / "copy")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(timm_dgate.ExportError, match="format version 99"):
        ExportedGatedModel(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "segment_1.onnx").unlink()
    with pytest.raises(timm_dgate.ExportError, match=r"lacks segment_1\.onnx"):
        ExportedGatedModel(folder)
    with pytest.raises(timm_dgate.ExportError, match=r"no manifest\.json"):
        ExportedGatedModel(tmp_path)


def test_a_model_whose_forward_is_not_a_chain_of_segments_is_refused_with_the_reason(tmp_path):
    vit = timm_dgate.wrap(timm.create_model("test_vit", num_classes=10).eval())
    with pytest.raises(timm_dgate.ExportError, match=r"not a chain of its segments: `pos_drop`.*position embedding"):
        timm_dgate.export(vit, tmp_path, format="torch")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_train_mode_a_compiled_model_and_an_unknown_format_are_refused(tmp_path):
    gated, _ = gated_with_mixed_exits()
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        timm_dgate.export(gated, tmp_path, format="tflite")
    gated.train()
    with pytest.raises(timm_dgate.ExportError, match=r"train mode.*gated.eval\(\)"):
        timm_dgate.export(gated, tmp_path)
    gated.eval().compile(backend="eager")
    with pytest.raises(timm_dgate.ExportError, match=r"before compile\(\)"):
        timm_dgate.export(gated, tmp_path)


def test_the_runtime_runs_one_policy_per_call_even_when_switched_mid_call(exported):
    """A profile switch while a call runs (here: inside its first segment) reaches only the next call;
    ``profile=`` runs a profile for one call and leaves the folder's active one in force."""
    _gated, images, folders = exported
    runtime = OnnxGatedModel(folders["onnx"], profile="first")
    want = {name: OnnxGatedModel(folders["onnx"], profile=name)(images, return_exits=True) for name in runtime.profiles}
    assert not torch.equal(want["first"].exits, want["mixed"].exits)
    first_segment = runtime.segments[0]

    def switching(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        runtime.use_profile("mixed")
        return first_segment(x)

    runtime.segments[0] = switching
    got = runtime(images, return_exits=True)
    assert runtime.active_profile == "mixed" and torch.equal(got.exits, want["first"].exits)
    runtime.segments[0] = first_segment
    runtime.use_profile("first")
    per_call = runtime(images, return_exits=True, profile="mixed")
    assert torch.equal(per_call.exits, want["mixed"].exits) and runtime.active_profile == "first"


def test_the_runtime_lets_a_score_equal_to_its_threshold_leave(exported):
    """The runtime's tie-break is the engine's: the threshold is set to one sample's score on the runtime's own
    margins, so the tie is exact whatever float error separates the export from eager."""
    _gated, images, folders = exported
    runtime = OnnxGatedModel(folders["onnx"])
    _, margins = runtime.segments[0](images.to(runtime.dtype))
    scores = margins.amax(1)
    tie = int(scores.argsort()[len(scores) // 2])
    runtime.set_thresholds([scores[tie].item(), math.inf, math.inf], exit_score="margin")
    exits = runtime(images, return_exits=True).exits
    assert exits[tie] == 0 and torch.equal(exits == 0, scores >= scores[tie])


def test_threads_switching_the_runtimes_profile_never_get_a_mixed_policy(exported):
    _gated, images, folders = exported
    hammer(OnnxGatedModel(folders["onnx"]), images, ("first", "mixed"), 0)
