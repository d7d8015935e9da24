"""``export(..., quantize="int8", calibration=loader)``: onnxruntime's static int8 quantization, the exits kept.

Each ONNX segment that ``export`` wrote (and checked against eager) is quantized on its own with
onnxruntime's static quantization: ``quant_pre_process`` first, as onnxruntime recommends, then
``quantize_static`` in the QDQ format with per-channel int8 weights and uint8 activations, the
ranges calibrated (MinMax) on validation images run through the eager segments before it. The
batch axis stays dynamic, so the runtime still removes the samples that leave.

Why uint8 activations: on the CPU onnxruntime runs U8S8 (uint8 activations, int8 weights) as fused
integer kernels; int8 activations (S8S8) ran slower than float32 on the 2-core AMD EPYC the
numbers in docs/deploy.md come from (a random-weight resnet18 at 32x32, batch 64: 902 images/s
against 2,252 in float32 and 3,879 with uint8 activations).

A gate is a pooling and one or two small linear layers after its segment: ``gates="fp32"`` leaves
its nodes out of the quantization (they are found in the graph, not by name: every node the
features output does not need). Calibration data is checked as threshold calibration's is
(``timm_dgate.core.provenance``): images the gates were fit on, or that ``evaluate`` measured the
model on, are refused.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.cache import FeatureCache
from ..core.contract import GatedBackbone
from ..core.provenance import image_fingerprints
from ..errors import ExportError
from .runtime import onnx_runner

QUANTIZE_KINDS = ("int8",)
GATE_CHOICES = ("int8", "fp32")
# int8 and fp32 gates measured alike within one run's noise (docs/deploy.md, "Quantized segments (int8)": 79.95% vs
# 79.85% test accuracy, 4.40x vs 4.32x plain int8 at batch 64); int8 keeps every node in integer kernels
DEFAULT_GATES = "int8"
MIN_CALIBRATION_IMAGES = 64  # fewer give activation ranges that the next images overshoot
MAX_CALIBRATION_IMAGES = 512  # the first 512 images of the loader; more barely move MinMax ranges


@dataclass
class QuantizePlan:
    """What ``export`` quantizes with: the kind, the gates' precision and the calibration images (CPU batches)."""

    kind: str
    gates: str
    batches: list[torch.Tensor]

    @property
    def num_images(self) -> int:
        return sum(len(b) for b in self.batches)


def _images(batch: object) -> torch.Tensor:
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, torch.Tensor):
        raise ExportError("calibration must yield image tensors or (images, labels) batches, "
                          f"got {type(images).__name__}")
    return images


def plan_quantization(
    gated: GatedBackbone, format: str, quantize: str | None, calibration: Iterable | None, gates: str | None
) -> QuantizePlan | None:
    """Check the quantization ``export`` was asked for and read its calibration images, before anything is written."""
    if quantize is None:
        if calibration is not None or gates is not None:
            raise ValueError("calibration= and quantize_gates= are for a quantized export: pass quantize='int8' too")
        return None
    if quantize not in QUANTIZE_KINDS:
        raise ValueError(f"unknown quantize {quantize!r}; expected one of {QUANTIZE_KINDS} (or None: float segments)")
    gates = gates or DEFAULT_GATES
    if gates not in GATE_CHOICES:
        raise ValueError(f"quantize_gates must be one of {GATE_CHOICES}, got {gates!r}")
    if format != "onnx":
        raise ExportError(f"quantize={quantize!r} quantizes ONNX segments with onnxruntime: export with format='onnx'")
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError as error:
        raise ExportError(f"a quantized export needs onnxruntime: pip install 'timm-dgate[onnx]' ({error})") from error
    dtype = next(gated.parameters()).dtype
    if dtype != torch.float32:
        raise ExportError(f"quantize={quantize!r} quantizes a float32 model; this one is {dtype}: call .float() first")
    if calibration is None or isinstance(calibration, FeatureCache):
        raise ExportError(
            f"quantize={quantize!r} needs calibration=: a loader of validation images (at least "
            f"{MIN_CALIBRATION_IMAGES}), which sets the int8 ranges; a feature cache holds no images"
        )
    batches, taken = [], 0
    for batch in calibration:
        images = _images(batch).detach().to("cpu", torch.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(gated.input_size):
            raise ExportError(f"calibration images must be (B, {', '.join(map(str, gated.input_size))}), "
                              f"got {tuple(images.shape)}")
        batches.append(images[: MAX_CALIBRATION_IMAGES - taken])
        taken += len(batches[-1])
        if taken >= MAX_CALIBRATION_IMAGES:
            break
    if taken < MIN_CALIBRATION_IMAGES:
        raise ExportError(f"calibration gave {taken} images; int8 calibration needs at least {MIN_CALIBRATION_IMAGES} "
                          "validation images (nothing was written)")
    try:
        gated.seen_images.check_calibration(torch.cat([image_fingerprints(b) for b in batches]))
    except ValueError as error:
        raise ExportError(f"int8 calibration data refused, nothing was written: {error}") from error
    return QuantizePlan(quantize, gates, batches)


def gate_nodes(model: Any) -> list[str]:
    """Names of the nodes of an ONNX segment that only its gate's margins need (none for the head segment)."""
    graph = model.graph
    if len(graph.output) < 2:
        return []
    producer = {out: node for node in graph.node for out in node.output}
    needed: set[int] = set()
    stack = [graph.output[0].name]  # the features the next segment takes
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    return [node.name for node in graph.node if id(node) not in needed]


def _reader(name: str, inputs: Iterator[torch.Tensor]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict | None:
            x = next(inputs, None)
            return None if x is None else {name: x.contiguous().numpy()}

    return Reader()


def _inputs(batches: Sequence[torch.Tensor], before: Sequence[nn.Module]) -> Iterator[torch.Tensor]:
    """What reaches a segment: each calibration batch through the eager segments ``before`` it (one batch held)."""
    for x in batches:
        with torch.no_grad():
            for chain in before:
                x = chain(x)
        yield x


def quantize_file(source: Path, target: Path, inputs: Iterable[torch.Tensor], gates: str = DEFAULT_GATES) -> None:
    """onnxruntime's static int8 quantization of one ONNX file, as ``export`` does it for each segment.

    ``inputs``: the batches its ranges are calibrated on; ``gates="fp32"`` leaves in float the
    nodes only its second output (a gate's margins) needs. The benchmarks quantize a plain model
    with it, so both sides of a comparison are quantized alike.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.parent / f".prepared-{target.name}"
    try:
        quant_pre_process(str(source), str(prepared))
        model = onnx.load(str(prepared))
        for i, node in enumerate(model.graph.node):  # nodes_to_exclude works by name
            node.name = node.name or f"timm_dgate_node_{i}"
        onnx.save(model, str(prepared))
        quantize_static(
            str(prepared), str(target), _reader(model.graph.input[0].name, iter(inputs)),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=gate_nodes(model) if gates == "fp32" else [],
        )
    finally:
        prepared.unlink(missing_ok=True)


@torch.no_grad()
def quantize_segments(plan: QuantizePlan, folder: Path, files: Sequence[str], chains: Sequence[nn.Module],
                      modules: Sequence[nn.Module]) -> dict[str, Any]:
    """Replace every float ONNX segment in ``folder`` by its int8 quantization; the manifest's ``quantization``.

    ``chains[k]``: the eager features of segment k (what the next one takes); ``modules[k]``: its
    eager outputs (features and margins, or the logits). The quantized files are then run on the
    calibration images: a file onnxruntime cannot quantize or run raises ExportError naming it, and
    the share of images whose plain int8 prediction is the float one's is recorded.
    """
    import onnxruntime

    work = folder / ".quantizing"  # inside the export's temporary folder: removed with it on failure
    work.mkdir()
    for k, name in enumerate(files):
        try:
            quantize_file(folder / name, work / name, _inputs(plan.batches, chains[:k]), plan.gates)
        except Exception as error:
            raise ExportError(f"onnxruntime could not quantize {name} ({type(error).__name__}: "
                              f"{str(error)[:300]}); nothing was written") from error
    for name in files:
        (work / name).replace(folder / name)
    shutil.rmtree(work)
    runners = [onnx_runner(folder / name) for name in files]
    agree = 0
    for x in plan.batches:
        want, got = x, x
        for name, module, runner in zip(files, modules, runners):
            expected = module(want)
            expected = expected if isinstance(expected, tuple) else (expected,)
            try:
                outputs = runner(got)
            except Exception as error:
                raise ExportError(f"the quantized {name} could not be run ({type(error).__name__}: {error}); "
                                  "nothing was written") from error
            if [o.shape for o in outputs] != [e.shape for e in expected]:
                raise ExportError(f"the quantized {name} gives outputs of other shapes than the eager segment; "
                                  "nothing was written")
            want, got = expected[0], outputs[0]
        agree += int((got.argmax(1) == want.argmax(1)).sum())
    return {
        "weights": "int8, per channel", "activations": "uint8", "format": "QDQ", "method": "MinMax",
        "gates": plan.gates, "calibration_images": plan.num_images,
        "calibration_agreement": agree / plan.num_images, "onnxruntime": onnxruntime.__version__,
    }
