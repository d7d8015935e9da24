"""The GPU path: one host synchronisation per open gate and nothing else; on CUDA, the same answers as on the CPU.

The sync count runs everywhere: a dispatch mode counts the operators that read a device value
back to the host or copy a Python number to the device (on CUDA each one waits for the device;
an NVIDIA H200 found the second kind). Tests marked ``gpu`` need CUDA and are skipped without it.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import timm_dgate

from .helpers import SIZE

HOST_SYNCS = {  # operators after which the host waits for the device on CUDA
    torch.ops.aten._local_scalar_dense.default,  # .item(), int(t), bool(t)
    torch.ops.aten.nonzero.default,  # boolean-mask indexing
    torch.ops.aten.equal.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.lift_fresh.default,  # a Python number made a tensor (t[i] = 3): a blocking copy to the device
}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class HostSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_SYNCS
        return func(*args, **(kwargs or {}))


def gated_model(device: str = "cpu") -> tuple[timm_dgate.GatedModel, torch.Tensor, list[float]]:
    """A tiny gated model, a batch, and thresholds at which samples leave at gates 0 and 2 (gate 1 closed)."""
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    gated = timm_dgate.wrap(backbone, input_size=(1, SIZE, SIZE))
    for gate in gated.gates:
        torch.nn.init.normal_(gate.fc.weight)  # on the CPU's generator: the same gates on every device
    gated.to(device)
    images = torch.randn(64, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        margins, _ = gated.forward_gates(images)
    scores = [m.amax(1).sort().values for m in margins]
    return gated, images, [float(scores[0][40:42].mean()), math.inf, float(scores[2][20:22].mean())]


@torch.no_grad()
def test_a_gated_forward_syncs_with_the_device_once_per_open_gate_and_never_otherwise():
    gated, images, thresholds = gated_model()
    for setting, reads in ((thresholds, 2), ([math.inf] * 3, 0), ([-math.inf, math.inf, math.inf], 1)):
        gated.set_thresholds(setting)
        with HostSyncs() as counter:
            gated(images)
        assert counter.count == reads, setting  # all leave at gate 0: the later gates are never reached


@cuda
@pytest.mark.gpu
@torch.no_grad()
def test_on_cuda_closed_gates_give_the_plain_model_and_forced_exits_are_exact():
    gated, images, thresholds = gated_model("cuda")
    gated.close_gates()
    assert torch.equal(gated(images), gated.base_model(images))
    margins, _ = gated.forward_gates(images)
    gated.set_thresholds([math.inf, -math.inf, math.inf])  # everyone leaves at gate 1
    result = gated(images, return_exits=True)
    assert torch.equal(result.logits, margins[1]) and (result.exits == 1).all()
    gated.set_thresholds(thresholds)
    cpu_gated, cpu_images, _ = gated_model()
    cpu_gated.set_thresholds(thresholds)
    want, got = cpu_gated(cpu_images, return_exits=True), gated(images, return_exits=True)
    assert torch.equal(got.exits.cpu(), want.exits)
    assert torch.allclose(got.logits.cpu(), want.logits, atol=1e-4)


@cuda
@pytest.mark.gpu
@torch.no_grad()
def test_on_cuda_syncs_are_one_per_open_gate():
    gated, images, thresholds = gated_model("cuda")
    gated.set_thresholds(thresholds)
    gated(images)  # warm-up: lazy initialisation may sync
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gated(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 2, syncs  # where they came from, for whoever runs this on a GPU


@cuda
@pytest.mark.gpu
@torch.no_grad()
def test_on_cuda_compiled_segments_match_eager():
    gated, images, thresholds = gated_model("cuda")
    gated.set_thresholds(thresholds)
    compiled = copy.deepcopy(gated)
    compiled.compile()
    for batch in (images[:1], images[:13], images):
        want, got = gated(batch, return_exits=True), compiled(batch, return_exits=True)
        assert torch.equal(got.exits, want.exits)
        assert torch.allclose(got.logits, want.logits, atol=1e-3)  # TF32 and fused kernels round differently


@cuda
@pytest.mark.gpu
def test_onnx_runtime_with_the_cuda_provider_matches_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)")
    from timm_dgate.deploy.runtime import OnnxGatedModel

    gated, images, thresholds = gated_model("cuda")
    gated.set_thresholds(thresholds)
    timm_dgate.export(gated, tmp_path)
    model = OnnxGatedModel(tmp_path, providers=["CUDAExecutionProvider"])
    with torch.no_grad():
        want = gated(images, return_exits=True)
    got = model(images, return_exits=True)
    assert got.logits.is_cuda and torch.equal(got.exits, want.exits)
    assert torch.allclose(got.logits, want.logits, atol=1e-3)
