"""CUDA graphs per segment (``gated.cuda_graphs()``): the bucket bookkeeping, checked on the CPU.

A graph replays at the batch size it was captured at, so a batch is padded up to its bucket and
only its own rows are copied out. ``eager_capture`` stands in for the CUDA capture here (it runs
the segment on the same static buffers at each replay), so every rule but the capture itself is
checked without a GPU: outputs equal eager at every batch size, padded rows never leak, train
mode and gradients run eagerly, no host sync is added. The capture on CUDA is tests/test_gpu.py's.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import timm_dgate
from timm_dgate.deploy.graphs import BucketedGraphs, default_buckets, eager_capture, graph_segments
from timm_dgate.deploy.refill import RefillExecutor

from .test_export import gated_with_mixed_exits
from .test_gpu import HostSyncs


class RowSum(torch.nn.Module):
    """Each output row depends on its input row only; records the batch sizes it really ran at."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 3))
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(len(x))
        return x @ self.weight, x.sum(1)


def test_default_buckets_are_powers_of_two_up_to_the_batch():
    assert default_buckets(1) == [1]
    assert default_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert default_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]


@torch.no_grad()
def test_a_batch_runs_at_its_bucket_and_only_its_own_rows_come_back():
    module = RowSum()
    reference = copy.deepcopy(module)
    graphs = BucketedGraphs(module, [4, 8], torch.device("cpu"), eager_capture)
    big = torch.full((8, 4), 1e6)
    graphs(big)  # leaves large values in the bucket's padded rows
    for n in (1, 3, 4, 5, 8, 19):  # 19: pieces of the largest bucket
        x = torch.randn(n, 4)
        got = graphs(x)
        want = reference(x)
        assert [g.shape for g in got] == [w.shape for w in want]
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert set(module.seen) == {4, 8} and set(graphs.captured) == {4, 8}  # it only ever ran at its buckets
    assert graphs(torch.empty(0, 4))[0].shape == (0, 3)


@torch.no_grad()
def test_unbounded_buckets_are_the_next_power_of_two():
    graphs = BucketedGraphs(RowSum(), None, torch.device("cpu"), eager_capture)
    for n in (1, 3, 5, 16, 17):
        graphs(torch.randn(n, 4))
    assert graphs.captured == [1, 4, 8, 16, 32]


def test_capturing_on_cuda_is_refused_for_a_cpu_model():
    with pytest.raises(RuntimeError, match="CUDA device"):
        BucketedGraphs(RowSum(), None, torch.device("cpu"))
    gated, _ = gated_with_mixed_exits()
    with pytest.raises(RuntimeError, match=r"CUDA device.*compile"):
        gated.cuda_graphs()
    with pytest.raises(ValueError, match="positive"):
        BucketedGraphs(RowSum(), [0, 4], torch.device("cpu"), eager_capture)


def graphed(buckets=None):
    gated, images = gated_with_mixed_exits()
    gated.use_profile("mixed")
    plain = copy.deepcopy(gated)
    segments = graph_segments(gated.base_model, [b.module for b in gated.boundaries], buckets, eager_capture)
    return gated.eval(), plain.eval(), images, segments


@torch.no_grad()
def test_graphed_segments_give_the_eager_exits_and_logits_at_every_batch_size():
    gated, plain, images, segments = graphed()
    assert segments.num_graphs == 0  # captured lazily
    for n in (1, 2, 3, 7, 33, 96):
        want, got = plain(images[:n], return_exits=True), gated(images[:n], return_exits=True)
        assert torch.equal(got.exits, want.exits)
        assert torch.allclose(got.logits, want.logits, rtol=0, atol=1e-5)
    assert segments.num_graphs > 0
    sizes = {size for g in segments.segments.values() for size in g.captured}
    assert sizes <= {1, 2, 4, 8, 16, 32, 64, 128}  # shrinking batches pad up to powers of two


@torch.no_grad()
def test_a_graphed_forward_adds_no_host_sync():
    gated, plain, images, _ = graphed()
    gated(images)  # captures
    with HostSyncs() as graphed_count:
        gated(images)
    with HostSyncs() as eager_count:
        plain(images)
    assert graphed_count.count == eager_count.count == 3  # one per open gate


def test_train_mode_and_gradients_run_eagerly_so_batchnorm_sees_no_padded_row():
    gated, plain, images, segments = graphed()
    gated.train(), plain.train()
    gated(images[:5]), plain(images[:5])  # batch 5 would pad to 8 in a graph
    for (name, a), b in zip(gated.base_model.named_buffers(), plain.base_model.buffers()):
        assert torch.equal(a, b), name
    assert segments.num_graphs == 0
    gated.eval(), plain.eval()
    with torch.enable_grad():
        assert torch.equal(gated(images[:5]), plain(images[:5]))
    assert segments.num_graphs == 0


@torch.no_grad()
def test_deepcopy_and_state_dict_of_a_graphed_model():
    gated, plain, images, _ = graphed()
    gated(images)
    twin = copy.deepcopy(gated)
    assert torch.equal(twin(images[:9]), gated(images[:9]))
    assert gated.state_dict().keys() == plain.state_dict().keys()
    with pytest.raises(timm_dgate.ExportError, match="cuda_graphs"):
        timm_dgate.export(gated, "unused-folder")


@torch.no_grad()
def test_threads_sharing_the_graphs_each_get_their_own_rows():
    gated, plain, images, _ = graphed([8, 32, 96])
    want = {n: plain(images[:n]) for n in (3, 8, 30, 96)}
    errors: list[str] = []

    def work(n: int) -> None:
        for _ in range(5):
            if not torch.allclose(gated(images[:n]), want[n], rtol=0, atol=1e-5):
                errors.append(f"batch {n}")

    threads = [threading.Thread(target=work, args=(n,)) for n in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_graphs_per_segment_and_graphs_per_stage_do_not_nest():
    gated, _, _, _ = graphed()
    with pytest.raises(ValueError, match="one or the other"):
        RefillExecutor(gated, 8, cuda_graphs=True)
