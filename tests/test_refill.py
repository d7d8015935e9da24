"""The refill executor (``timm_dgate.predict``): stages run on pooled survivors, and every sample still gets
exactly what ``model(x, return_exits=True)`` gives it, in input order.

Each test compares with per-batch calls of the model itself, with thresholds between two neighbouring
scores so samples leave at every gate and none sits within float error of a threshold (the executor
runs a sample in other batch compositions than the call does).
"""

from __future__ import annotations

import math
import threading

import pytest
import timm
import torch

import timm_dgate
from timm_dgate.deploy.refill import RefillExecutor
from timm_dgate.deploy.runtime import OnnxGatedModel

from .helpers import SIZE
from .test_export import between_scores, gated_with_mixed_exits
from .test_gpu import HostSyncs


class HostReads(HostSyncs):
    """Host syncs, and the refill executor's explicit copies to the host (on CUDA each one waits for the device)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        copies = func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to)
        self.count += copies and kwargs.get("device") == torch.device("cpu")
        return super().__torch_dispatch__(func, types, args, kwargs)


SIZES = (37, 1, 0, 64, 5, 82, 3)  # uneven, size 1, empty, larger than the stage batch


def split(images: torch.Tensor, sizes=SIZES) -> list[torch.Tensor]:
    return list(images[: sum(sizes)].split(list(sizes)))


def assert_as_called(model, batches, results, profile=None, atol=1e-5) -> torch.Tensor:
    """Every result equals the model's own call on that batch; returns all exits, for checking coverage."""
    assert len(results) == len(batches)
    exits = []
    for images, got in zip(batches, results):
        with torch.no_grad():
            want = model(images, return_exits=True, profile=profile)
        assert got.logits.shape == want.logits.shape and torch.equal(got.exits, want.exits)
        assert torch.allclose(got.logits, want.logits, rtol=0, atol=atol)
        exits.append(got.exits)
    return torch.cat(exits)


@pytest.fixture(scope="module")
def mixed():
    gated, images = gated_with_mixed_exits()
    gated.use_profile("mixed")
    return gated.eval(), torch.cat([images, -images])  # 192 images


@pytest.mark.parametrize("batch_size", [1, 16, 64, 200])
def test_predict_gives_each_batch_what_the_model_gives_it_in_input_order(mixed, batch_size):
    gated, images = mixed
    batches = split(images)
    exits = assert_as_called(gated, batches, list(timm_dgate.predict(gated, batches, batch_size=batch_size)))
    assert set(exits.tolist()) == {0, 1, 2, 3}  # samples left at every gate and reached the head


def test_each_stage_runs_full_batches_and_only_the_flush_is_partial(mixed):
    gated, images = mixed
    executor = RefillExecutor(gated, batch_size=32)
    tickets = [executor.submit(b) for b in split(images)]
    executor.run_full()
    assert all(q.size < 32 for q in executor.queues)  # whatever waits is less than a batch
    runs_before_flush = list(executor.stats.runs)
    assert executor.stats.rows == [32 * n for n in runs_before_flush]  # every stage ran at exactly 32 rows
    executor.flush()
    assert executor.waiting == 0 and all(executor.done(t) for t in tickets)
    assert [r - b for r, b in zip(executor.stats.runs, runs_before_flush)] <= [1] * len(runs_before_flush)
    assert sum(executor.stats.rows[k] for k in range(4)) > len(images)  # survivors ran on at later stages
    assert_as_called(gated, split(images), [executor.pop(t) for t in tickets])


def test_tickets_of_different_profiles_share_a_stage_batch_and_each_runs_its_own(mixed):
    gated, images = mixed
    gated.add_profile(timm_dgate.Profile("late", (math.inf, math.inf, gated.profile("mixed").thresholds[2])))
    executor = RefillExecutor(gated, batch_size=48)
    plan = [(b, p) for b, p in zip(split(images), ["mixed", "first", None, "late", "mixed", "first", "late"])]
    tickets = [executor.submit(b, p) for b, p in plan]
    executor.flush()
    for (images_k, profile), ticket in zip(plan, tickets):
        assert_as_called(gated, [images_k], [executor.pop(ticket)], profile=profile)
    with pytest.raises(KeyError, match="mixed"):
        executor.submit(images[:2], "nonexistent")  # names the known profiles


def test_one_host_sync_per_stage_run_at_an_open_gate_and_none_at_closed_ones(mixed):
    gated, images = mixed
    executor = RefillExecutor(gated, batch_size=64)
    executor.submit(images[:64], "first")  # only gate 0 opens: one stage run decides
    with HostReads() as counter:
        executor.run_full()
    assert executor.stats.runs[0] == 1 and counter.count == 1
    executor.flush()
    gated_closed = RefillExecutor(gated, batch_size=64)
    gated_closed.submit(images[:64], timm_dgate.ExitPolicy.closed(3))
    with HostReads() as counter:
        gated_closed.flush()
    assert counter.count == 0 and gated_closed.stats.runs == [1, 1, 1, 1]


@pytest.mark.parametrize("name", ["test_convnext", "test_efficientnet", "test_byobnet", "test_nfnet"])
def test_predict_matches_the_model_on_other_families(name):
    torch.manual_seed(0)
    backbone = timm.create_model(name, in_chans=1, num_classes=10).eval()
    gated = timm_dgate.wrap(backbone, input_size=(1, SIZE, SIZE)).eval()
    images = torch.randn(120, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        margins, _ = gated.forward_gates(images)
    gated.set_thresholds([between_scores(m.amax(1), 0.6) for m in margins])
    batches = split(images, (50, 1, 33, 36))
    exits = assert_as_called(gated, batches, list(timm_dgate.predict(gated, batches, batch_size=24)), atol=1e-4)
    assert len(set(exits.tolist())) > 1


def test_predict_runs_an_exported_folder_as_its_runtime_runs_it(mixed, tmp_path):
    gated, images = mixed
    timm_dgate.export(gated, tmp_path / "onnx")
    runtime = OnnxGatedModel(tmp_path / "onnx")
    batches = split(images)
    assert_as_called(runtime, batches, list(timm_dgate.predict(runtime, batches, batch_size=40)), atol=1e-4)


def test_loader_tuples_and_a_profile_for_the_run(mixed):
    gated, images = mixed
    labels = torch.arange(len(images))
    loader = list(zip(split(images), split(labels)))
    results = list(timm_dgate.predict(gated, loader, profile="first"))
    assert_as_called(gated, split(images), results, profile="first")


def test_threads_each_with_their_own_predict_get_their_own_profile(mixed):
    gated, images = mixed
    batches = split(images)
    results: dict[str, list] = {}

    def work(profile: str) -> None:
        results[profile] = list(timm_dgate.predict(gated, batches, batch_size=16, profile=profile))

    threads = [threading.Thread(target=work, args=(p,)) for p in ("mixed", "first")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for profile in ("mixed", "first"):
        assert_as_called(gated, batches, results[profile], profile=profile)


def test_what_cannot_run_is_refused_with_the_reason(mixed):
    gated, images = mixed
    with pytest.raises(ValueError, match="expected images"):
        list(timm_dgate.predict(gated, [images[:, :, :8]]))
    with pytest.raises(RuntimeError, match="CUDA"):
        list(timm_dgate.predict(gated, [images], cuda_graphs=True))
    with pytest.raises(ValueError, match="batch_size"):
        RefillExecutor(gated, batch_size=0)
    gated.train()
    try:
        with pytest.raises(ValueError, match="train mode"):
            list(timm_dgate.predict(gated, [images]))
    finally:
        gated.eval()
    vit = timm_dgate.wrap(timm.create_model("test_vit", in_chans=1, num_classes=10, img_size=SIZE).eval(),
                          input_size=(1, SIZE, SIZE)).eval()
    with pytest.raises(timm_dgate.ExportError, match="chain"):
        list(timm_dgate.predict(vit, [images[:4]]))
    pair = timm_dgate.cascade([gated, vit])
    with pytest.raises(timm_dgate.ExportError, match="cascade"):
        list(timm_dgate.predict(pair.eval(), [images[:4]]))
