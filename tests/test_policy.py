"""One exit policy per call: thresholds, exit score and profile name are one value, read once, never torn.

A server switches profiles while other threads run, and picks a profile per request. These tests
switch the model's profile from inside a running forward (the worst moment) and check that the
call still runs the policy it started with, that ``model(x, profile=...)`` runs that profile for
that call alone, and that a cascade never reads or changes its members' own policies.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import threading

import pytest
import timm
import torch
from torch import nn

import timm_dgate
from timm_dgate import ExitPolicy, Profile
from timm_dgate.core.scores import exit_score

from .helpers import SIZE

BATCH = 32


def gated_with_two_profiles() -> tuple[timm_dgate.GatedModel, torch.Tensor]:
    """``first`` lets a third out at gate 0 only (margin); ``all`` opens every gate on the softmax score."""
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    gated = timm_dgate.wrap(backbone, input_size=(1, SIZE, SIZE))
    for gate in gated.gates:
        nn.init.normal_(gate.fc.weight)
    x = torch.randn(BATCH, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        margins, _ = gated.forward_gates(x)
    first = (margins[0].amax(1).quantile(0.7).item(), math.inf, math.inf)
    every = [m.float().softmax(1).amax(1).quantile(0.5).item() for m in margins]
    gated.add_profile(Profile("first", first))
    gated.add_profile(Profile("all", every, exit_score="softmax"))
    return gated, x


def switch_during_forward(module: nn.Module, owner, name: str) -> None:
    """Switch ``owner`` to profile ``name`` when ``module`` runs: in the middle of a forward."""

    def switch(*_: object) -> None:
        owner.use_profile(name)

    module.register_forward_hook(switch)


@torch.no_grad()
def test_a_profile_switch_inside_a_running_forward_does_not_reach_that_call():
    gated, x = gated_with_two_profiles()
    want = {name: copy.deepcopy(gated) for name in gated.profiles}
    for name, model in want.items():
        model.use_profile(name)
    expected = {name: model(x, return_exits=True) for name, model in want.items()}
    assert not torch.equal(expected["first"].exits, expected["all"].exits)  # the profiles differ on x

    gated.use_profile("first")
    switch_during_forward(gated.base_model.layer1, gated, "all")  # after gate 0's decision: gate 1 opens in "all"
    got = gated(x, return_exits=True)
    assert gated.active_profile == "all"  # the switch happened, mid-call
    assert torch.equal(got.exits, expected["first"].exits) and torch.equal(got.logits, expected["first"].logits)
    again = gated(x, return_exits=True)  # the next call runs the new policy
    assert torch.equal(again.exits, expected["all"].exits)


@torch.no_grad()
def test_a_profile_per_call_runs_that_profile_and_leaves_the_model_as_it_was():
    gated, x = gated_with_two_profiles()
    gated.use_profile("first")
    alone = copy.deepcopy(gated)
    alone.use_profile("all")
    want = alone(x, return_exits=True)
    got = gated(x, return_exits=True, profile="all")
    assert torch.equal(got.exits, want.exits) and torch.equal(got.logits, want.logits)
    assert gated.active_profile == "first" and gated.policy == ExitPolicy.of_profile(gated.profiles["first"])
    by_policy = gated(x, return_exits=True, profile=alone.policy)
    assert torch.equal(by_policy.exits, want.exits)
    with pytest.raises(KeyError, match=r"unknown profile 'fast'.*first, all"):
        gated(x, profile="fast")
    with pytest.raises(ValueError, match="1 thresholds; this model has 3"):
        gated(x, profile=ExitPolicy((0.0,)))


def test_the_policy_is_one_frozen_value_replaced_whole():
    gated, _ = gated_with_two_profiles()
    before = gated.policy
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.thresholds = (0.0, 0.0, 0.0)  # type: ignore[misc]
    gated.use_profile("all")
    assert before == ExitPolicy.closed(3) and gated.policy is not before
    assert (gated.thresholds, gated.exit_score, gated.active_profile) == (
        gated.policy.thresholds, "softmax", "all",
    )
    gated.set_thresholds([1.0, math.inf, math.inf])  # by hand: no profile name, the score kept
    assert gated.policy == ExitPolicy((1.0, math.inf, math.inf), "softmax", None)


@torch.no_grad()
def test_state_dict_restores_the_policy_that_ran_not_the_profile_reread():
    gated, x = gated_with_two_profiles()
    gated.use_profile("all")
    gated.set_thresholds([t - 0.01 for t in gated.thresholds])  # tuned by hand after the profile
    tuned = gated.policy
    other, _ = gated_with_two_profiles()
    other.load_state_dict(gated.state_dict())
    assert other.policy == tuned and other.profiles == gated.profiles
    assert torch.equal(other(x, return_exits=True).exits, gated(x, return_exits=True).exits)


def cascade_pair() -> tuple[timm_dgate.GatedModel, timm_dgate.Cascade, torch.Tensor]:
    torch.manual_seed(2)
    small = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    gated, x = gated_with_two_profiles()
    gated.use_profile("first")
    return gated, timm_dgate.cascade([small, gated], input_sizes=[(1, 16, 16), None]), x


@torch.no_grad()
def test_a_cascade_never_reads_or_changes_its_members_policies():
    gated, model, x = cascade_pair()
    assert gated.active_profile == "first" and gated.policy == ExitPolicy.of_profile(gated.profiles["first"])
    assert model.thresholds == (math.inf,) * model.num_gates  # the cascade starts closed on its own
    plain = model(x, return_exits=True)
    assert torch.equal(plain.exits, torch.full((BATCH,), model.num_gates))  # the member's "first" is not run
    caches = model.cache_features([(x, torch.zeros(BATCH, dtype=torch.long))], "probe", progress=False)
    scores = model.exit_table(caches).scores
    model.set_thresholds([s.quantile(0.6).item() for s in scores])
    assert gated.active_profile == "first" and gated.policy == ExitPolicy.of_profile(gated.profiles["first"])


@torch.no_grad()
def test_a_cascade_profile_switch_mid_call_does_not_reach_that_call_and_state_dict_keeps_it():
    _gated, model, x = cascade_pair()
    caches = model.cache_features([(x, torch.zeros(BATCH, dtype=torch.long))], "probe", progress=False)
    scores = model.exit_table(caches).scores
    model.add_profile(Profile("head", [scores[0].quantile(0.5).item()] + [math.inf] * 3, exit_score="softmax"))
    model.add_profile(Profile("late", [math.inf] + [s.quantile(0.4).item() for s in scores[1:]], "softmax"))
    alone = copy.deepcopy(model)
    alone.use_profile("head")
    want = alone(x, return_exits=True)
    model.use_profile("head")
    switch_during_forward(model.members[0].base_model, model, "late")
    got = model(x, return_exits=True)
    assert model.active_profile == "late"
    assert torch.equal(got.exits, want.exits) and torch.equal(got.logits, want.logits)

    other = copy.deepcopy(alone)
    other.close_gates()
    other.profiles.clear()
    other.load_state_dict(model.state_dict())
    assert other.policy == model.policy and other.profiles == model.profiles


@torch.no_grad()
def test_a_score_equal_to_its_threshold_leaves_in_the_eager_model_and_at_a_cascade_head():
    """The exit rule has one tie-break everywhere (``>=``); a sample whose score is exactly the threshold leaves."""
    gated, x = gated_with_two_profiles()
    margins, _ = gated.forward_gates(x)
    scores = margins[0].amax(1)
    tie = int(scores.argsort()[len(scores) // 2])  # a middle sample: some leave with it, some stay
    gated.set_thresholds([scores[tie].item(), math.inf, math.inf])
    exits = gated(x, return_exits=True).exits
    assert exits[tie] == 0 and torch.equal(exits == 0, scores >= scores[tie])

    _gated, model, x = cascade_pair()
    head = model.members[0](nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True))
    head_scores = exit_score(head, "softmax")  # the library's score: a tie to the last bit
    model.set_thresholds([head_scores[tie].item()] + [math.inf] * 3, exit_score="softmax")
    out = model(x, return_exits=True)
    assert out.exits[tie] == 0 and torch.equal(out.exits == 0, head_scores >= head_scores[tie])


def hammer(model, x: torch.Tensor, names: tuple[str, str], seed: int) -> None:
    """Threads call ``model`` on random sub-batches while another switches its profile back and forth.

    A call with ``profile=`` must equal that profile's single-threaded result; a call without must equal
    one profile's result on every row (the one in force when it started), never a mix of the two.
    """
    want = {}
    for name in names:
        model.use_profile(name)
        want[name] = model(x, return_exits=True)
    failures: list[str] = []
    stop = threading.Event()

    def switch() -> None:
        while not stop.is_set():
            for name in names:
                model.use_profile(name)

    def call(worker: int) -> None:
        rng = random.Random(seed * 100 + worker)
        for _ in range(12):
            rows = torch.tensor(rng.sample(range(len(x)), rng.randint(1, len(x))))
            chosen = rng.choice([None, *names])
            got = model(x[rows], return_exits=True, profile=chosen)
            matches = [
                name for name in names
                if torch.equal(got.exits, want[name].exits[rows])
                and torch.allclose(got.logits, want[name].logits[rows], rtol=0, atol=1e-5)
            ]
            if (chosen is not None and chosen not in matches) or not matches:
                failures.append(f"worker {worker}: profile={chosen} matched {matches}")

    switcher = threading.Thread(target=switch)
    workers = [threading.Thread(target=call, args=(w,)) for w in range(3)]
    switcher.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    switcher.join()
    assert failures == []


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1])
def test_threads_switching_profiles_never_get_a_mixed_policy_gated_model(seed):
    gated, x = gated_with_two_profiles()
    hammer(gated, x, ("first", "all"), seed)


@torch.no_grad()
def test_threads_switching_profiles_never_get_a_mixed_policy_cascade():
    _gated, model, x = cascade_pair()
    caches = model.cache_features([(x, torch.zeros(BATCH, dtype=torch.long))], "probe", progress=False)
    scores = model.exit_table(caches).scores
    model.add_profile(Profile("head", [scores[0].quantile(0.5).item()] + [math.inf] * 3, exit_score="softmax"))
    model.add_profile(Profile("late", [math.inf] + [s.quantile(0.4).item() for s in scores[1:]], "softmax"))
    hammer(model, x, ("head", "late"), 0)


@torch.no_grad()
def test_the_saved_policy_is_the_one_that_ran_and_thresholds_cannot_be_assigned_past_it(tmp_path):
    gated, x = gated_with_two_profiles()
    gated.use_profile("all")
    with pytest.raises(AttributeError):
        gated.thresholds = (0.0, 0.0, 0.0)  # a bare assignment would keep the profile's name over other values
    gated.set_thresholds([t + 0.01 for t in gated.thresholds])
    ran = gated.policy
    loaded = timm_dgate.from_pretrained(gated.save_pretrained(tmp_path / "tuned"))
    assert loaded.policy == ran and loaded.active_profile is None
    assert torch.equal(loaded(x, return_exits=True).exits, gated(x, return_exits=True).exits)
    gated.use_profile("first")
    assert timm_dgate.from_pretrained(gated.save_pretrained(tmp_path / "first")).policy == gated.policy
