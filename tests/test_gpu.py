"""The GPU path: one host synchronisation per open gate and nothing else; on CUDA, the same answers as on the CPU.

The sync count runs everywhere: a dispatch mode counts the operators that read a device value
back to the host or copy a Python number to the device (on CUDA each one waits for the device;
an NVIDIA H200 found the second kind). Tests marked ``gpu`` need CUDA and are skipped without it;
they cover the eager, compiled and ONNX paths, and the segments replayed from CUDA graphs
(``gated.cuda_graphs()``, alone and after ``compile()``, in fp32 and bf16 autocast) and the refill
executor on graphs (``timm_dgate.predict(..., cuda_graphs=True)``). benchmarks/gpu.sh runs them.
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


def cuda_syncs(gated: timm_dgate.GatedModel, images: torch.Tensor) -> list[str]:
    """Where one forward synchronised with the device, as torch's sync debug mode reports it on CUDA."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gated(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


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
    syncs = cuda_syncs(gated, images)
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


@pytest.fixture
def exact_fp32(monkeypatch):
    """cuDNN convolutions in full fp32 (torch lets them use TF32 by default): a graph pads a batch to its bucket, and
    another batch size may get another algorithm, so eager and graphed runs agree to 1e-4 only without TF32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@cuda
@pytest.mark.gpu
@torch.no_grad()
def test_on_cuda_graphs_give_the_eager_exits_and_logits_at_every_batch_size(exact_fp32):
    gated, images, thresholds = gated_model("cuda")
    gated.set_thresholds(thresholds)
    graphed = copy.deepcopy(gated)
    graphs = graphed.cuda_graphs()
    for n in (1, 3, 8, 13, 37, 64, 5):  # 3, 13, 37, 5: between buckets, so padded rows; 5 after larger batches
        want, got = gated(images[:n], return_exits=True), graphed(images[:n], return_exits=True)
        assert torch.equal(got.exits, want.exits), n
        assert torch.allclose(got.logits, want.logits, atol=1e-4), n
    assert graphs.num_graphs > 0 and graphs.memory_bytes > 0


@cuda
@pytest.mark.gpu
@torch.no_grad()
def test_on_cuda_graphs_sync_with_the_host_at_most_once_per_open_gate():
    gated, images, thresholds = gated_model("cuda")
    gated.set_thresholds(thresholds)
    gated.cuda_graphs()
    for _ in range(2):  # warm-up: captures every bucket this batch reaches
        gated(images)
    syncs = cuda_syncs(gated, images)
    assert len(syncs) <= 2, syncs  # gates 0 and 2 open; a replay itself waits for nothing


@cuda
@pytest.mark.gpu
@torch.no_grad()
def test_on_cuda_graphs_replay_under_bf16_autocast_and_keep_fp32_graphs_apart(exact_fp32):
    gated, images, thresholds = gated_model("cuda")
    gated.set_thresholds(thresholds)
    graphed = copy.deepcopy(gated)
    graphs = graphed.cuda_graphs()
    for n in (8, 64):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want, got = gated(images[:n], return_exits=True), graphed(images[:n], return_exits=True)
        assert got.logits.dtype == want.logits.dtype == torch.bfloat16  # captured under autocast
        agree = got.exits == want.exits  # bf16 rounds per kernel: a score at a threshold may fall either side
        assert agree.float().mean() >= 0.9, (got.exits, want.exits)
        assert torch.allclose(got.logits[agree].float(), want.logits[agree].float(), atol=0.1, rtol=0.05)
    in_bf16 = graphs.num_graphs
    want, got = gated(images, return_exits=True), graphed(images, return_exits=True)  # fp32 again: its own graphs
    assert got.logits.dtype == torch.float32 and graphs.num_graphs > in_bf16
    assert torch.equal(got.exits, want.exits)
    assert torch.allclose(got.logits, want.logits, atol=1e-4)


@cuda
@pytest.mark.gpu
@torch.no_grad()
def test_on_cuda_compiled_segments_replay_from_graphs(exact_fp32):
    gated, images, thresholds = gated_model("cuda")
    gated.set_thresholds(thresholds)
    fast = copy.deepcopy(gated)
    fast.compile()
    fast.cuda_graphs()
    for n in (1, 13, 64, 13):  # 13 again: a replay of what was captured
        want, got = gated(images[:n], return_exits=True), fast(images[:n], return_exits=True)
        assert torch.equal(got.exits, want.exits), n
        assert torch.allclose(got.logits, want.logits, atol=1e-3), n  # fused kernels round differently


@cuda
@pytest.mark.gpu
@torch.no_grad()
def test_on_cuda_predict_on_graphs_equals_one_eager_call_per_batch(exact_fp32):
    gated, images, thresholds = gated_model("cuda")
    gated.set_thresholds(thresholds)
    batches = list(images.split(24))  # 24, 24, 16: stages pool the survivors of several batches; the last is partial
    want = [gated(b, return_exits=True) for b in batches]
    got = list(timm_dgate.predict(gated, batches, batch_size=24, cuda_graphs=True))
    assert len(got) == len(want)
    for w, g in zip(want, got):
        assert g.logits.is_cuda and torch.equal(g.exits, w.exits)
        assert torch.allclose(g.logits, w.logits, atol=1e-4)
