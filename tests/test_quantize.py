"""``export(..., quantize="int8")``: int8 segments that keep the exits, thresholds chosen on the int8 runtime itself.

One gated model (the trained tiny backbone, MLP gates fit on the training slice, a profile chosen on
the float model) is exported quantized once per module; the tests run its runtime against the eager
model, force exits through it, calibrate and evaluate it, and feed export bad input.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import timm_dgate
from timm_dgate.deploy import quantize
from timm_dgate.deploy.runtime import OnnxGatedModel
from timm_dgate.errors import ExportError

from .helpers import batches, tiny_gated, trained_gated

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, fmnist, trained_backbone):
    gated = trained_gated(trained_backbone, gate_hidden=16)
    timm_dgate.fit(gated, batches(fmnist.train), epochs=20, progress=False)
    val = batches(fmnist.val)
    gated.calibrate(val, max_drop=0.02, name="float -2pt")
    folder = tmp_path_factory.mktemp("int8") / "export"
    timm_dgate.export(gated, folder, quantize="int8", calibration=val)
    return gated, folder


def test_the_int8_export_is_quantized_and_predicts_as_the_float_model_on_most_images(quantized, fmnist):
    gated, folder = quantized
    runtime = OnnxGatedModel(folder)
    manifest = runtime.manifest
    assert manifest.quantize == "int8" and runtime.precision == "int8"
    assert manifest.quantization["gates"] == quantize.DEFAULT_GATES
    assert manifest.quantization["calibration_images"] == quantize.MAX_CALIBRATION_IMAGES
    assert manifest.chosen_on == {"float -2pt": "fp32"}  # carried over from the float model, and said so
    assert set(manifest.checksums) == set(manifest.segments)
    for name in manifest.segments:  # every segment really holds int8 weights and activations
        ops = {node.op_type for node in onnx.load(str(folder / name)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name
    images, _ = next(iter(batches(fmnist.test, 1000)))
    with torch.no_grad():
        want_margins, want = gated.forward_gates(images)
    got_margins, got = runtime.forward_gates(images)
    assert not torch.allclose(got, want, atol=1e-3)  # not the float model
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9
    for g, w in zip(got_margins, want_margins):
        assert (g.argmax(1) == w.argmax(1)).float().mean() >= 0.9
    assert manifest.quantization["calibration_agreement"] >= 0.9


def test_closed_gates_are_the_plain_int8_model_and_a_forced_exit_takes_out_exactly_those_samples(quantized, fmnist):
    _, folder = quantized
    runtime = OnnxGatedModel(folder)
    images, _ = next(iter(batches(fmnist.test, 200)))
    margins, logits = runtime.forward_gates(images)
    runtime.close_gates()
    closed = runtime(images, return_exits=True)
    assert (closed.exits == runtime.num_gates).all() and torch.equal(closed.logits, logits)
    assert torch.equal(runtime.plain_forward(images), logits)
    runtime.set_thresholds([math.inf, -math.inf, math.inf])  # everyone who reaches gate 1 leaves there
    result = runtime(images, return_exits=True)
    assert (result.exits == 1).all() and torch.allclose(result.logits, margins[1], atol=1e-5)
    scores = margins[0].amax(1)
    middle = float(scores.median())
    runtime.set_thresholds([middle, -math.inf, math.inf])
    result = runtime(images, return_exits=True)
    first = scores >= middle
    assert 0 < first.sum() < len(images)
    assert torch.equal(result.exits, torch.where(first, 0, 1))
    assert torch.equal(result.logits[first], margins[0][first])
    assert torch.allclose(result.logits[~first], margins[1][~first], atol=1e-4)  # gate 1 on the smaller batch


def test_calibrate_and_evaluate_work_on_the_runtime_on_its_own_scores_and_the_profile_saves(quantized, fmnist):
    _, folder = quantized
    runtime = OnnxGatedModel(shutil.copytree(folder, folder.parent / "calibrated"))
    val, test = batches(fmnist.val), batches(fmnist.test)
    profile = timm_dgate.calibrate(runtime, val, max_drop=0.02, name="int8 -2pt")
    assert runtime.active_profile == "int8 -2pt" and runtime.chosen_on["int8 -2pt"] == "int8"
    images, labels = (torch.cat(t) for t in zip(*val))
    assert profile.val_plain_accuracy == (runtime.plain_forward(images).argmax(1) == labels).double().mean().item()
    assert profile.val_gflops < runtime.costs.backbone / 1e9  # some samples leave early, paid as recorded at export
    report = timm_dgate.evaluate(runtime, test, profiles=["int8 -2pt"], timing_images=64, repeats=1, progress=False)
    (result,) = report.profiles
    images, labels = (torch.cat(t) for t in zip(*test))
    assert result.accuracy == (runtime(images).argmax(1) == labels).double().mean().item()
    with pytest.raises(ValueError, match="evaluate\\(\\) already measured"):  # the test split chooses nothing
        timm_dgate.calibrate(runtime, test, max_drop=0.02)
    runtime.save_profiles()
    loaded = OnnxGatedModel(runtime.folder)
    assert loaded.active_profile == "int8 -2pt" and loaded.profiles["int8 -2pt"].thresholds == profile.thresholds
    assert loaded.chosen_on == {"float -2pt": "fp32", "int8 -2pt": "int8"}


@pytest.mark.filterwarnings("ignore:timm_dgate.export")
def test_calibration_images_too_few_fit_on_or_of_the_test_split_are_refused_before_writing(quantized, fmnist, tmp_path):
    gated, _ = quantized
    target = tmp_path / "never"
    with pytest.raises(ExportError, match="calibration gave 40 images; int8 calibration needs at least 64"):
        timm_dgate.export(gated, target, quantize="int8", calibration=batches(fmnist.val, 20)[:2])
    with pytest.raises(ExportError, match="the gates were fit on"):
        timm_dgate.export(gated, target, quantize="int8", calibration=batches(fmnist.train))
    model = tiny_gated()
    timm_dgate.evaluate(model, batches(fmnist.test), profiles=[], timing_images=32, repeats=1, progress=False,
                        allow_chance_accuracy=True)
    with pytest.raises(ExportError, match="evaluate\\(\\) already measured this model on"):
        timm_dgate.export(model, target, quantize="int8", calibration=batches(fmnist.test))
    with pytest.raises(ExportError, match="needs calibration="):
        timm_dgate.export(model, target, quantize="int8")
    with pytest.raises(ExportError, match="format='onnx'"):
        timm_dgate.export(model, target, format="torch", quantize="int8", calibration=batches(fmnist.val))
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_changed_segment_or_a_manifest_that_disagrees_is_refused_at_load(quantized, fmnist, tmp_path):
    _, folder = quantized
    copy = shutil.copytree(folder, tmp_path / "copy")
    damaged = bytearray((copy / "segment_1.onnx").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (copy / "segment_1.onnx").write_bytes(bytes(damaged))
    with pytest.raises(ExportError, match=r"segment_1\.onnx does not match its sha256"):
        OnnxGatedModel(copy)
    shutil.copy(folder / "segment_1.onnx", copy / "segment_1.onnx")
    manifest = json.loads((copy / "manifest.json").read_text())
    for changes, message in (
        ({"checksums": {}}, r"checksums must give the sha256 of every segment file .*a quantized export carries them"),
        ({"quantize": "int4"}, r"quantize must be null or, for an ONNX export, one of \('int8',\)"),
        ({"quantization": {}}, r"quantization must be a map whose gates is 'int8' or 'fp32'"),
    ):
        (copy / "manifest.json").write_text(json.dumps(manifest | changes))
        with pytest.raises(ExportError, match=r"manifest\.json: " + message):
            OnnxGatedModel(copy)
    added = ("costs", "checksums", "quantize", "quantization", "chosen_on")
    (copy / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k not in added}))
    older = OnnxGatedModel(copy)  # a folder of an earlier version still loads
    with pytest.raises(ExportError, match="records no FLOPs"):
        timm_dgate.calibrate(older, batches(fmnist.val), max_drop=0.02)


@pytest.mark.filterwarnings("ignore:timm_dgate.export")
def test_gates_kept_in_float_and_a_failed_quantization_leaves_the_previous_export(quantized, fmnist, tmp_path,
                                                                                monkeypatch):
    _, folder = quantized
    model = tiny_gated()
    model = timm_dgate.wrap(model.base_model, [1], input_size=model.input_size)  # one gate: two files, quicker
    target = shutil.copytree(folder, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import onnxruntime.quantization

    def fails(*args, **kwargs):
        raise RuntimeError("an operator onnxruntime cannot quantize")

    with monkeypatch.context() as patch:
        patch.setattr(onnxruntime.quantization, "quantize_static", fails)
        with pytest.raises(ExportError, match=r"onnxruntime could not quantize segment_0\.onnx .*nothing was written"):
            timm_dgate.export(model, target, quantize="int8", calibration=batches(fmnist.val))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left behind
    timm_dgate.export(model, target, quantize="int8", calibration=batches(fmnist.val), quantize_gates="fp32")
    runtime = OnnxGatedModel(target)
    assert runtime.manifest.quantization["gates"] == "fp32"
    graph = onnx.load(str(target / "segment_0.onnx")).graph
    float_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert gemms and all(n.input[1] in float_weights for n in gemms)  # the gate's linear layer reads float weights
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # the segment itself is int8
