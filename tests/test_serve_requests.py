"""What a served model does without Ray (``timm_dgate.serve``'s requests and runners): requests parsed or refused
with what was expected, and the work a replica does giving each request exactly the model's own answer.

The same code runs inside the Ray Serve replicas (tests/test_serve.py runs them for real).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import timm_dgate
from timm_dgate.fashion_mnist import preprocess, timm_data_config
from timm_dgate.serve.requests import BadRequest, answer, check_tensor, decode_image, parse_http, policy_for
from timm_dgate.serve.runners import GroupedRunner, RefillRunner, SegmentRunner
from timm_dgate.serve.spec import folder_kind, plain_spec, spec_of

from .test_cascade import random_pair
from .test_export import gated_with_mixed_exits

PROFILES = ["mixed", "first", None, "late"]  # None: the active profile ("first")


@pytest.fixture(scope="module")
def mixed():
    """The tiny gated model whose profiles send images out at every gate, a third profile, and its spec."""
    gated, images = gated_with_mixed_exits()
    mixed = gated.profile("mixed").thresholds
    gated.add_profile(timm_dgate.Profile("late", (math.inf, math.inf, mixed[2])))
    gated.use_profile("first")
    return gated.eval(), images, spec_of(gated, "folder", "gated")


def own_answer(model, x: torch.Tensor, profile) -> tuple[torch.Tensor, int]:
    with torch.no_grad():
        result = model(x[None], return_exits=True, profile=profile)
    return result.logits[0], int(result.exits[0])


def png(image: torch.Tensor) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image.numpy()).save(out, format="PNG")
    return out.getvalue()


def npy(x: torch.Tensor) -> bytes:
    out = io.BytesIO()
    np.save(out, x.numpy())
    return out.getvalue()


def test_an_unknown_profile_is_refused_naming_the_profiles_and_none_is_the_active_one(mixed):
    _, _, spec = mixed
    assert policy_for(spec, None) == spec.profiles["first"] and policy_for(spec, "late").profile == "late"
    with pytest.raises(BadRequest, match="unknown profile 'fast'; this model's profiles: 'mixed', 'first', 'late'"):
        policy_for(spec, "fast")
    with pytest.raises(BadRequest, match="profiles: none"):
        policy_for(plain_spec(spec), "mixed")


def test_tensors_of_the_wrong_shape_or_kind_are_refused_saying_what_was_expected(mixed):
    _, images, spec = mixed
    assert torch.equal(check_tensor(images[:1], spec), images[0])  # (1, C, H, W) is one image too
    assert check_tensor(images[0].tolist(), spec).shape == (1, 32, 32)
    expected = r"expected a tensor of shape \(1, 32, 32\) or \(1, 1, 32, 32\)"
    for bad in (images[:2], torch.zeros(3, 32, 32), torch.zeros(32, 32), [[1, 2], [3]], "image"):
        with pytest.raises(BadRequest, match=expected):
            check_tensor(bad, spec)
    with pytest.raises(BadRequest, match="NaN"):
        check_tensor(torch.full((1, 32, 32), math.nan), spec)


def test_http_bodies_image_json_and_npy_give_the_same_input_and_the_profile_from_query_or_json(fmnist):
    gated, _ = gated_with_mixed_exits()
    gated.base_model.pretrained_cfg = {**gated.base_model.pretrained_cfg, **timm_data_config(32)}
    spec = spec_of(gated, "folder", "gated")
    raw = fmnist.test.tensors[0][:3]  # uint8 (3, 1, 28, 28)
    want = preprocess(raw, 32)
    for image, expected in zip(raw, want):  # the eval transform of the folder's config is the training preprocessing
        x, profile = parse_http(png(image[0]), "image/png", {"profile": "mixed"}, spec)
        assert profile == "mixed" and torch.allclose(x, expected, atol=1e-5)
    as_json = json.dumps({"tensor": want[0].tolist(), "profile": "first"}).encode()
    x, profile = parse_http(as_json, "application/json; charset=utf-8", {}, spec)
    assert profile == "first" and torch.allclose(x, want[0])
    assert parse_http(as_json, "application/json", {"profile": "mixed"}, spec)[1] == "mixed"  # the query wins
    x, profile = parse_http(npy(want[0]), "application/x-npy", {}, spec)
    assert profile is None and torch.equal(x, want[0])


def test_bodies_that_cannot_work_are_refused_saying_what_was_expected(mixed):
    _, images, spec = mixed
    cases = {
        (b"\x89PNG not really", "image/png"): "could not decode the body as an image",
        (b"", "image/png"): "empty body",
        (b"{not json", "application/json"): "not valid JSON",
        (json.dumps({"tensor": [[0.0]]}).encode(), "application/json"): r"expected a tensor of shape \(1, 32, 32\)",
        (json.dumps({"pixels": []}).encode(), "application/json"): 'one of "tensor"',
        (json.dumps({"image": "@@@"}).encode(), "application/json"): "not valid base64",
        (b"\x93NUMPY garbage", "application/x-npy"): r"could not read the body as a .npy array",
        (npy(images[:2]), "application/x-npy"): r"got shape \(2, 1, 32, 32\)",
    }
    for (body, content_type), message in cases.items():
        with pytest.raises(BadRequest, match=message):
            parse_http(body, content_type, {}, spec)


def test_a_model_without_preprocessing_refuses_images_unless_given_a_data_config(mixed, fmnist):
    """An export records no preprocessing (tests/test_serve.py serves one); ``data_config`` supplies it."""
    gated, _, spec = mixed
    image = png(fmnist.test.tensors[0][0, 0])
    with pytest.raises(BadRequest, match="records no image preprocessing"):
        decode_image(image, replace(spec, data_config=None))
    config = timm_data_config(32)
    given = spec_of(gated, "folder", "gated", {"mean": config["mean"], "std": config["std"],
                                                "crop_pct": config["crop_pct"]})
    assert torch.allclose(decode_image(image, given), preprocess(fmnist.test.tensors[0][:1], 32)[0], atol=1e-5)
    assert folder_kind("org/some-hub-id") == "gated"


def test_segment_runners_chained_give_each_row_its_own_profiles_answer(mixed):
    """Rows of four profiles in every batch, handed stage to stage as the segment deployments hand them."""
    gated, images, spec = mixed
    runners = [SegmentRunner(gated, k) for k in range(gated.num_gates + 1)]
    policies = [policy_for(spec, PROFILES[i % 4]) for i in range(len(images))]
    rows = list(zip(images, policies, range(len(images))))
    answers: dict[int, tuple[torch.Tensor, int]] = {}
    for k, runner in enumerate(runners):
        out = runner.run([(x, p) for x, p, _ in rows])
        answers.update({i: (value, k) for (left, value), (_, _, i) in zip(out, rows) if left})
        rows = [(value, p, i) for (left, value), (_, p, i) in zip(out, rows) if not left]
    assert not rows and len(answers) == len(images)
    for i, x in enumerate(images):
        logits, k = own_answer(gated, x, PROFILES[i % 4])
        assert answers[i][1] == k and torch.allclose(answers[i][0], logits, atol=1e-5)
    assert {k for _, k in answers.values()} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="stage 4 does not exist"):
        SegmentRunner(gated, 4)


def test_the_refill_runner_answers_every_request_as_the_model_would_and_counts_each_stage_run(mixed):
    gated, images, spec = mixed
    runner = RefillRunner(gated, batch_size=16)
    requests = [(x, policy_for(spec, PROFILES[i % 4])) for i, x in enumerate(images)]
    answers, sizes = {}, []
    tickets = []
    for start in range(0, len(requests), 20):  # collections of 20: full stage runs, survivors carried over
        new, finished, batches = runner.step(requests[start : start + 20], flush=False)
        tickets += new
        answers.update(finished)
        sizes += batches
    assert runner.pending and all(rows == 16 for _, rows in sizes)  # only full batches before the flush
    _, finished, batches = runner.step([], flush=True)
    answers.update(finished)
    sizes += batches
    assert runner.pending == 0 and sorted(answers) == tickets
    assert sum(rows for stage, rows in sizes if stage == "0") == len(images)
    for (x, _), ticket, name in zip(requests, tickets, PROFILES * 24):
        logits, k = own_answer(gated, x, name)
        assert answers[ticket][1] == k and torch.allclose(answers[ticket][0], logits, atol=1e-5)
    stats = runner.executor.stats
    assert [n for stage, n in sizes] and stats.rows == [sum(n for s, n in sizes if s == str(k)) for k in range(4)]


def test_the_grouped_runner_serves_a_cascade_by_profile_and_the_plain_backbone(mixed):
    small, big = random_pair()
    cascade = timm_dgate.cascade([small, big], input_sizes=[(1, 16, 16), None]).eval()
    x = torch.randn(12, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scores = torch.softmax(small(torch.nn.functional.interpolate(x, size=16, mode="bilinear")), 1).amax(1)
    cascade.add_profile(timm_dgate.Profile("half", (float(scores.median()), math.inf, math.inf, math.inf),
                                           exit_score="softmax"))
    policies = [cascade.policy_for("half" if i % 2 else None) for i in range(len(x))]
    tickets, finished, batches = GroupedRunner(cascade).step(list(zip(x, policies)), flush=False)
    assert sorted(n for _, n in batches) == [6, 6]
    for i, ticket in enumerate(tickets):
        logits, k = own_answer(cascade, x[i], "half" if i % 2 else None)
        assert finished[ticket][1] == k and torch.allclose(finished[ticket][0], logits, atol=1e-5)
    gated, images, spec = mixed
    tickets, finished, _ = GroupedRunner(gated, plain=True).step([(x, spec.active) for x in images[:5]], flush=False)
    with torch.no_grad():
        plain = gated.base_model(images[:5])
    assert all(finished[t][1] == 3 and torch.allclose(finished[t][0], plain[i], atol=1e-5)
               for i, t in enumerate(tickets))


def test_an_answer_has_the_class_probabilities_exit_and_profile(mixed):
    _, _, spec = mixed
    logits = torch.tensor([0.0, 2.0, 1.0] + [-5.0] * 7)
    reply = answer(logits, 1, spec.profiles["late"], spec)
    assert reply["class"] == 1 and reply["exit"] == 1 and reply["profile"] == "late" and reply["label"] is None
    assert math.isclose(sum(reply["probabilities"]), 1.0, rel_tol=1e-6) and len(reply["probabilities"]) == 10
    json.dumps(reply)  # what the HTTP ingress sends
