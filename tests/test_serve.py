"""Serving on a real local Ray (2 CPUs, a tiny model): ``timm_dgate.serve``'s applications answer every request
with the model's own output for it, refuse bad requests without losing a replica, survive a replica killed under
load without a wrong answer, and leave no process behind.

One Ray session serves the whole module (Ray and each replica take seconds to start): the per-segment and the
whole-model applications of one gated folder are deployed together. Tests marked ``slow`` (a killed replica, a
cascade and an export served) run with ``--runslow``. Skipped where Ray Serve is not installed (the ``serve``
extra; CI installs it).
"""

from __future__ import annotations

import base64
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import timm_dgate

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")

from timm_dgate.serve import BadRequest, build_app, start  # noqa: E402

from .test_export import gated_with_mixed_exits  # noqa: E402
from .test_serve_requests import PROFILES, npy, own_answer, png  # noqa: E402

BATCHING = dict(max_batch_size=16, batch_wait_timeout_s=0.02, ray_actor_options={"num_cpus": 0})
SHAPES = ("segments", "whole")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """The running Ray session: the model, its folder, the HTTP port, and each application's handle."""

    def __init__(self, gated, images, folder, port, before):
        self.gated, self.images, self.folder, self.port, self.before = gated, images, folder, port, before
        self.handles: dict[str, object] = {}
        self.up = True

    def url(self, name: str, query: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}{query}"

    def shutdown(self) -> list:
        """Stop Serve and Ray; the processes Ray started that are still alive after a grace period."""
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in self.before]
        if self.up:
            self.up = False
            serve.shutdown()
            ray.shutdown()
        _, alive = psutil.wait_procs(started, timeout=20)
        return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    gated, images = gated_with_mixed_exits()
    mixed = gated.profile("mixed").thresholds
    gated.add_profile(timm_dgate.Profile("late", (math.inf, math.inf, mixed[2])))
    gated.use_profile("first")
    folder = gated.save_pretrained(tmp_path_factory.mktemp("serve") / "gated")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    state = Served(gated.eval(), images, folder, free_port(), before)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": state.port})
        targets = [serve.RunTarget(build_app(folder, shape=shape, **BATCHING), name=shape, route_prefix=f"/{shape}")
                   for shape in SHAPES]
        state.handles = dict(zip(SHAPES, serve.run_many(targets)))
        yield state
    finally:
        state.shutdown()


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def assert_own_answer(gated, x: torch.Tensor, profile, reply: dict) -> int:
    logits, k = own_answer(gated, x, profile)
    assert reply["exit"] == k and reply["class"] == int(logits.argmax())
    assert torch.allclose(torch.tensor(reply["probabilities"]), torch.softmax(logits, 0), atol=1e-5)
    assert reply["profile"] == (profile or "first")
    return k


@pytest.mark.parametrize("shape", SHAPES)
def test_each_answer_is_the_models_own_output_with_profiles_mixed_in_one_batch(served, shape):
    """128 concurrent handle calls cycling through four profiles: every request's class, probabilities and exit are
    what ``gated(x, profile=...)`` gives that image alone, and batches held requests of several profiles."""
    images = torch.cat([served.images, -served.images[:32]])
    profiles = [PROFILES[i % 4] for i in range(len(images))]
    replies = [r.result(timeout_s=120) for r in [served.handles[shape].predict.remote(x, p)
                                                 for x, p in zip(images, profiles)]]
    exits = {assert_own_answer(served.gated, x, p, r) for x, p, r in zip(images, profiles, replies)}
    assert exits == {0, 1, 2, 3}
    stats = get(served.url(shape, "/stats"))
    assert stats["shape"] == shape
    batches = {stage: b for d in stats["deployments"] for stage, b in d["batches"].items()}
    first = batches["0" if shape == "segments" else "collected"]
    assert first["largest"] > 1 and first["mixed"] > 0  # several requests, of several profiles, in one batch
    answered = sum(n for d in stats["deployments"] for by_profile in d["exits"].values() for n in by_profile.values())
    assert answered >= len(images)


def test_http_answers_image_files_tensors_and_npy_arrays_like_the_handle(served):
    gated, x = served.gated, served.images[5]
    status, reply = post(served.url("segments", "?profile=mixed"), npy(x), "application/x-npy")
    assert status == 200 and set(reply) == {"class", "label", "probabilities", "exit", "profile"}
    assert_own_answer(gated, x, "mixed", reply)
    body = json.dumps({"tensor": x[None].tolist(), "profile": "late"}).encode()
    status, reply = post(served.url("whole"), body, "application/json")
    assert status == 200 and assert_own_answer(gated, x, "late", reply) is not None
    image = (torch.rand(28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    from timm_dgate.serve.requests import decode_image
    from timm_dgate.serve.spec import spec_of

    expected = decode_image(png(image), spec_of(gated, "", "gated"))  # the folder's timm eval transform
    for shape in SHAPES:
        status, reply = post(served.url(shape), png(image), "image/png")
        assert status == 200 and assert_own_answer(gated, expected, None, reply) is not None
        as_json = json.dumps({"image": base64.b64encode(png(image)).decode(), "profile": "mixed"}).encode()
        status, reply = post(served.url(shape), as_json, "application/json")
        assert status == 200 and assert_own_answer(gated, expected, "mixed", reply) is not None
    described = get(served.url("whole"))
    assert described["profiles"] == ["mixed", "first", "late"] and described["input_size"] == [1, 32, 32]
    assert described["active_profile"] == "first" and described["shape"] == "whole"


def test_bad_requests_are_400s_saying_what_was_expected_and_the_replicas_go_on(served):
    x = served.images[7]
    counts_before = get(served.url("segments", "/stats"))
    cases = [
        (served.url("segments", "?profile=fast"), npy(x), "application/x-npy",
         "unknown profile 'fast'; this model's profiles: 'mixed', 'first', 'late'"),
        (served.url("whole"), b"GIF89a definitely not an image", "image/gif", "could not decode the body as an image"),
        (served.url("segments"), json.dumps({"tensor": torch.zeros(3, 32, 32).tolist()}).encode(), "application/json",
         "expected a tensor of shape (1, 32, 32) or (1, 1, 32, 32), got shape (3, 32, 32)"),
        (served.url("whole"), npy(torch.zeros(1, 28, 28)), "application/x-npy", "got shape (1, 28, 28)"),
    ]
    for url, body, content_type, message in cases:
        status, reply = post(url, body, content_type)
        assert status == 400 and message in reply["error"], reply
    with pytest.raises(BadRequest, match=r"expected a tensor of shape \(1, 32, 32\)"):
        served.handles["segments"].predict.remote(torch.zeros(2, 1, 32, 32)).result(timeout_s=60)
    with pytest.raises(BadRequest, match="unknown profile 'fast'"):
        served.handles["whole"].predict.remote(x, "fast").result(timeout_s=60)
    for shape in SHAPES:  # the same replicas answer on: their counts went on, not from zero
        status, reply = post(served.url(shape, "?profile=mixed"), npy(x), "application/x-npy")
        assert status == 200 and assert_own_answer(served.gated, x, "mixed", reply) is not None
    rows = [get(served.url("segments", "/stats")), counts_before]
    rows = [stats["deployments"][0]["batches"]["0"]["rows"] for stats in rows]
    assert rows[0] == rows[1] + 1


def replica_actor(app: str, deployment: str):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


@pytest.mark.slow
def test_a_replica_killed_under_load_fails_or_retries_requests_but_never_answers_wrongly(served):
    """Load from a client thread while segment 1's replica is killed: each request is answered right or fails;
    Serve starts a new replica and the application answers again."""
    handle, gated, images = served.handles["segments"], served.gated, served.images
    outcomes: list[tuple[int, object]] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set() and i < 2000:  # bounded
            batch = [(j % len(images), PROFILES[j % 4]) for j in range(i, i + 8)]
            responses = [handle.predict.remote(images[j], p) for j, p in batch]
            for (j, p), response in zip(batch, responses):
                try:
                    outcomes.append((j, p, response.result(timeout_s=60)))
                except Exception as error:  # a request lost with the replica
                    outcomes.append((j, p, error))
            i += 8

    def wait_for(count: int) -> None:  # by outcomes, not seconds: a loaded machine answers slower
        deadline = time.monotonic() + 120
        while len(outcomes) < count and client.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)

    client = threading.Thread(target=load)
    client.start()
    wait_for(16)  # under load before the kill
    ray.kill(replica_actor("segments", "segment1"), no_restart=True)
    wait_for(len(outcomes) + 16)  # and through it
    stop.set()
    client.join(timeout=120)
    answered = [(j, p, r) for j, p, r in outcomes if isinstance(r, dict)]
    for j, p, reply in answered:
        assert_own_answer(gated, images[j], p, reply)
    assert len(answered) >= 16
    deadline = time.monotonic() + 90
    while True:  # the controller replaces the replica
        try:
            reply = handle.predict.remote(images[3], "mixed").result(timeout_s=30)
            break
        except Exception:
            assert time.monotonic() < deadline, "no new replica within 90 s"
            time.sleep(1)
    assert_own_answer(gated, images[3], "mixed", reply)


@pytest.mark.slow
def test_a_cascade_folder_whole_and_an_export_per_segment_answer_as_their_models(served, tmp_path):
    from timm_dgate.deploy.runtime import ExportedGatedModel

    from .test_cascade import random_pair

    small, big = random_pair()
    cascade = timm_dgate.cascade([small, big], input_sizes=[(1, 16, 16), None]).eval()
    cascade.add_profile(timm_dgate.Profile("half", (0.3, math.inf, math.inf, math.inf), exit_score="softmax"))
    cascade_folder = cascade.save_pretrained(tmp_path / "cascade")
    timm_dgate.export(served.gated, tmp_path / "onnx", format="onnx")
    runtime = ExportedGatedModel(tmp_path / "onnx")
    with pytest.raises(timm_dgate.errors.InputError, match="per segment"):
        build_app(cascade_folder, shape="segments")
    handles = [
        serve.run(build_app(cascade_folder, shape="whole", **BATCHING), name="cascade", route_prefix="/cascade"),
        start(tmp_path / "onnx", name="onnx", route_prefix="/onnx", port=served.port, **BATCHING),
    ]
    images = served.images[:40]
    for handle, model, profiles in ((handles[0], cascade, ["half", None]), (handles[1], runtime, PROFILES)):
        chosen = [profiles[i % len(profiles)] for i in range(len(images))]
        replies = [r.result(timeout_s=120) for r in [handle.predict.remote(x, p) for x, p in zip(images, chosen)]]
        for x, p, reply in zip(images, chosen, replies):
            logits, k = own_answer(model, x, p)
            assert reply["exit"] == k and torch.allclose(torch.tensor(reply["probabilities"]),
                                                         torch.softmax(logits, 0), atol=1e-4)
    status, reply = post(served.url("onnx"), png(torch.zeros(28, 28, dtype=torch.uint8)), "image/png")
    assert status == 400 and "records no image preprocessing" in reply["error"]
    serve.delete("cascade")
    serve.delete("onnx")


def test_shutdown_leaves_no_process_behind(served):
    assert served.shutdown() == []
    assert not ray.is_initialized()

