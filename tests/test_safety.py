"""A gated model never gives a silently wrong answer: threads, train mode, dtypes, tracing, state_dict, unwrap.

Each test is named as the rule it checks. Models are tiny random timm ResNets whose gates get
random weights and thresholds at score quantiles, so real samples exit at every gate; their plain
accuracy is chance, so calibrate and evaluate run with ``allow_chance_accuracy=True``: these
tests check mechanics, not numbers.
"""

from __future__ import annotations

import copy
import io
import math
import random
import threading

import pytest
import timm
import torch

import timm_dgate
from timm_dgate.evaluation.bench import throughput
from timm_dgate.evaluation.evaluate import evaluate

from .helpers import SIZE, batches, hooks


def open_gated(seed: int = 0, backbone: torch.nn.Module | None = None) -> timm_dgate.GatedModel:
    """A tiny gated ResNet whose gates are open: about a third of the samples leave at each of the first two."""
    torch.manual_seed(seed)
    backbone = backbone or timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    gated = timm_dgate.wrap(backbone, input_size=(1, SIZE, SIZE))
    for gate in gated.gates:
        torch.nn.init.normal_(gate.fc.weight)
    x = torch.randn(64, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    x = x.to(next(backbone.parameters()).dtype)
    with torch.no_grad():
        margins, _ = gated.forward_gates(x)
    gated.set_thresholds([margins[0].amax(1).quantile(0.7).item(), margins[1].amax(1).quantile(0.5).item(), math.inf])
    return gated


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ---- 1. exit state belongs to the call ---------------------------------------------------------------


def test_threads_profiles_batch_sizes_and_dtypes_each_get_their_single_threaded_output():
    """Randomized: wrappers of one shared backbone (one per profile, float32 and bfloat16) and the plain
    backbone itself, called from many threads at once with batch sizes 0-65, equal single-threaded eager."""
    rng = random.Random(0)
    callers = {}
    for dtype in (torch.float32, torch.bfloat16):
        backbone = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval().to(dtype)
        first = open_gated(0, backbone)
        for profile, scale in (("eager", 1.0), ("careful", 1.3), ("closed", math.inf)):
            gated = first if profile == "eager" else open_gated(0, backbone)  # another wrapper, same backbone
            gated.load_state_dict(first.state_dict())
            gated.set_thresholds([t * scale if t > 0 else t / scale for t in first.thresholds])
            callers[(dtype, profile)] = gated
        callers[(dtype, "plain")] = backbone
    tasks = []
    for i in range(120):
        key = rng.choice(list(callers))
        tasks.append((key, inputs(rng.randint(0, 65), seed=i).to(key[0])))
    with torch.no_grad():
        expected = [callers[key](x) for key, x in tasks]
        exits = callers[(torch.float32, "eager")](inputs(64), return_exits=True).exits
    assert (exits == 0).any() and (exits == 3).any(), "the test needs samples that exit and samples that go on"

    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(indices: list[int]) -> None:
        try:
            with torch.no_grad():
                for i in indices:
                    key, x = tasks[i]
                    results[i] = callers[key](x)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    order = list(range(len(tasks))) * 2
    rng.shuffle(order)
    threads = [threading.Thread(target=worker, args=(order[k::6],)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    for i, want in enumerate(expected):
        assert results[i].shape == want.shape, tasks[i][0]
        assert torch.allclose(results[i].float(), want.float(), rtol=0, atol=1e-5 if want.dtype == torch.float32
                              else 1e-2), tasks[i][0]


def test_a_plain_backbone_call_during_a_gated_forward_in_another_thread_is_untouched():
    gated = open_gated()
    plain, x1, x2 = gated.base_model, inputs(48), inputs(32, seed=2)
    with torch.no_grad():
        want = plain(x2)
    stop, errors = threading.Event(), []

    def gated_loop() -> None:
        try:
            with torch.no_grad():
                while not stop.is_set():
                    gated(x1)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=gated_loop)
    thread.start()
    try:
        with torch.no_grad():
            outs = [plain(x2) for _ in range(40)]
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]
    assert all(torch.equal(out, want) for out in outs)


def test_two_wrappers_of_one_backbone_do_not_share_exits():
    backbone = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    eager, closed = open_gated(0, backbone), timm_dgate.wrap(backbone, input_size=(1, SIZE, SIZE))
    x = inputs(40)
    with torch.no_grad():
        assert (closed(x, return_exits=True).exits == closed.num_gates).all()
        assert torch.equal(closed(x), backbone(x))
        assert (eager(x, return_exits=True).exits < eager.num_gates).any()


# ---- 2. train mode runs no exit ----------------------------------------------------------------------


def test_train_mode_runs_no_exit_and_equals_the_backbone_in_the_same_mode(tmp_path):
    gated = open_gated()
    x = inputs(16)
    gated.train()
    assert gated.base_model.training
    with torch.no_grad():
        want = gated.base_model(x)
        out = gated(x, return_exits=True)
    assert torch.equal(out.logits, want) and (out.exits == gated.num_gates).all()
    gated.base_model(x[:1].expand(2, -1, -1, -1))  # BatchNorm in train mode still gets its whole batch
    gated.eval()
    with torch.no_grad():
        assert (gated(x, return_exits=True).exits < gated.num_gates).any()

    gated.save_pretrained(tmp_path)
    loaded = timm_dgate.from_pretrained(tmp_path)
    fitted = copy.deepcopy(gated)
    fitted.freeze_backbone()  # what fit() does
    for model in (loaded, fitted):
        model.train()
        with torch.no_grad():
            assert (model(x, return_exits=True).exits == model.num_gates).all()


def test_wrap_starts_in_the_backbones_mode():
    backbone = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    assert timm_dgate.wrap(backbone, input_size=(1, SIZE, SIZE)).training
    assert not timm_dgate.wrap(backbone.eval(), input_size=(1, SIZE, SIZE)).training


# ---- 3. every dtype ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_costs_calibrate_evaluate_cache_and_stages_work_in_half_precision(dtype, fmnist, tmp_path):
    gated = open_gated()
    reference = gated.costs
    half = copy.deepcopy(gated).to(dtype)
    half._costs = None
    assert half.costs.to_gate == reference.to_gate and half.costs.backbone == reference.backbone
    assert timm_dgate.stages(half.base_model, (1, SIZE, SIZE))[0].layout == "NCHW"
    data = [(x.to(dtype), y) for x, y in batches(fmnist.val, 250)[:1]]
    cache = timm_dgate.cache_features(half, data, split="validation", progress=False)
    assert cache.features[0].dtype == torch.float32 and cache.logits.dtype == torch.float32
    half.calibrate(cache, max_gflops=0.8 * reference.backbone / 1e9, name="budget", allow_chance_accuracy=True)
    report = evaluate(half, data, timing_images=32, repeats=1, progress=False, allow_chance_accuracy=True)
    assert report.profiles[0].gflops <= 0.8 * reference.backbone / 1e9 + 1e-9
    half.save_pretrained(tmp_path)
    loaded = timm_dgate.from_pretrained(tmp_path)  # loads as float32, as docs/concepts.md says
    assert next(loaded.parameters()).dtype == torch.float32


# ---- 4. tracing and export refuse instead of lying ----------------------------------------------------


def test_tracing_scripting_and_export_refuse_open_gates_with_what_works():
    gated = open_gated()
    x = inputs(16)
    with pytest.raises(RuntimeError, match=r"torch.jit.trace.*close_gates\(\)"):
        torch.jit.trace(gated, x)
    with pytest.raises(RuntimeError, match=r"torch.export.*close_gates\(\)"):
        torch.export.export(gated, (x,))
    with pytest.raises(RuntimeError, match=r"torch.jit.script.*base_model"):
        torch.jit.script(gated)
    with pytest.raises(RuntimeError, match=r"close_gates\(\)"):
        torch.onnx.export(gated, (x,), io.BytesIO(), dynamo=False)


def test_closed_gates_trace_as_the_plain_model():
    gated = open_gated()
    gated.close_gates()
    x = inputs(16)
    traced = torch.jit.trace(gated, x)
    other = inputs(16, seed=5)
    with torch.no_grad():
        assert torch.allclose(traced(other), gated.base_model(other), atol=1e-5)


# ---- 5. state_dict carries the behaviour ---------------------------------------------------------------


def test_state_dict_restores_thresholds_profiles_and_exits_in_a_fresh_wrapper():
    gated = open_gated()
    gated.add_profile(timm_dgate.Profile("half-open", (gated.thresholds[0], math.inf, math.inf)), activate=True)
    gated.add_profile(timm_dgate.Profile("closed", (math.inf,) * 3))
    gated.use_profile("half-open")
    x = inputs(40)
    with torch.no_grad():
        want = gated(x, return_exits=True)
    fresh = timm_dgate.wrap(timm.create_model("test_resnet", in_chans=1, num_classes=10).eval(),
                            input_size=(1, SIZE, SIZE))
    fresh.load_state_dict(gated.state_dict())
    assert fresh.active_profile == "half-open" and set(fresh.profiles) == {"half-open", "closed"}
    assert fresh.thresholds == gated.thresholds and fresh.exit_score == gated.exit_score
    with torch.no_grad():
        got = fresh(x, return_exits=True)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.exits, want.exits)
    assert (want.exits == 0).any()


def test_state_dict_of_another_gate_layout_is_refused_naming_both():
    gated = open_gated()
    other = timm_dgate.wrap(timm.create_model("test_resnet", in_chans=1, num_classes=10).eval(), ["layer2", "layer3"],
                            input_size=(1, SIZE, SIZE))
    with pytest.raises((ValueError, RuntimeError), match=r"gates at \['layer2', 'layer3'\].*\['layer1', 'layer2'"):
        gated.load_state_dict(other.state_dict(), strict=False)


def test_deepcopy_runs_independently_and_unwrapping_a_copy_leaves_the_original_gated():
    gated = open_gated()
    x = inputs(32)
    with torch.no_grad():
        want = gated(x, return_exits=True)
    clone = copy.deepcopy(gated)
    with torch.no_grad():
        assert torch.equal(clone(x), want.logits)
    clone.unwrap()
    with torch.no_grad():
        assert torch.equal(gated(x, return_exits=True).exits, want.exits)
    assert hooks(clone.base_model) == 0 and hooks(gated.base_model) == gated.num_gates


# ---- 7. nothing is left changed behind the user's back -----------------------------------------------


def test_evaluate_and_bench_leave_hand_set_thresholds_and_mode_as_they_found_them(fmnist):
    gated = open_gated()
    gated.add_profile(timm_dgate.Profile("closed", (math.inf,) * 3))
    hand_set, score = gated.thresholds, gated.exit_score
    data = batches(fmnist.val, 250)[:1]
    evaluate(gated, data, timing_images=32, repeats=1, progress=False, allow_chance_accuracy=True)
    throughput(gated, data[0][0][:32], [16], ["closed"], repeats=1)
    assert gated.thresholds == hand_set and gated.exit_score == score and gated.active_profile is None
    assert gated.profiles["closed"].test == {}  # evaluate writes into profiles only with record=True
    evaluate(gated, data, timing_images=32, repeats=1, record=True, progress=False, allow_chance_accuracy=True)
    assert gated.profiles["closed"].test["split"] == "test"


# ---- 9. smaller ones ---------------------------------------------------------------------------------


def test_an_unwrapped_model_refuses_forward_calibrate_and_save(tmp_path, fmnist):
    gated = open_gated()
    plain = gated.unwrap()
    assert hooks(plain) == 0
    for call in (lambda: gated(inputs(4)), lambda: gated.calibrate(batches(fmnist.val)[:1], max_drop=0.01),
                 lambda: gated.save_pretrained(tmp_path)):
        with pytest.raises(RuntimeError, match="unwrapped"):
            call()


def test_timm_model_api_answers_with_the_backbones():
    gated = open_gated()
    backbone = gated.base_model
    assert timm.data.resolve_model_data_config(gated) == timm.data.resolve_model_data_config(backbone)
    assert gated.pretrained_cfg is backbone.pretrained_cfg and gated.default_cfg is backbone.pretrained_cfg
    assert gated.get_classifier() is backbone.get_classifier() and gated.num_classes == backbone.num_classes
    x = inputs(4)
    with torch.no_grad():
        assert torch.equal(gated.forward_head(gated.forward_features(x)), backbone(x))
    with pytest.raises(RuntimeError, match="gates were trained for this head"):
        gated.reset_classifier(3)


def test_wrapping_a_gated_model_is_refused_as_already_gated():
    with pytest.raises(timm_dgate.UnsupportedModelError, match="already gated"):
        timm_dgate.wrap(open_gated())
