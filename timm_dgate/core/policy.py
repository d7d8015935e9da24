"""The exit policy: thresholds, exit score and profile name as one immutable value, and the profiles it comes from.

A model with exits (a :class:`~timm_dgate.GatedModel`, a :class:`~timm_dgate.Cascade`, an exported
folder's runtime) holds exactly one :class:`ExitPolicy` at a time. Switching a profile or setting
thresholds replaces that value in one assignment, and a forward reads it once at its start, so a
switch in another thread can never mix one profile's thresholds with another's score.
:class:`ExitPolicyOwner` is that bookkeeping, written once for every model with exits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .engine import Decide
from .profiles import Profile, check_profile_name, decode_thresholds, encode_thresholds
from .scores import check_exit_score, exit_score


@dataclass(frozen=True)
class ExitPolicy:
    """What decides exits in one call: one threshold per exit (``inf`` closes it), how gate outputs become
    a confidence (``exit_score``), and the name of the profile it came from (``None``: set by hand)."""

    thresholds: tuple[float, ...]
    exit_score: str = "margin"
    profile: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", decode_thresholds(list(self.thresholds)))
        check_exit_score(self.exit_score)

    @classmethod
    def closed(cls, num_gates: int, exit_score: str = "margin") -> ExitPolicy:
        """Every exit closed: the model behaves exactly as its plain backbone."""
        return cls((math.inf,) * num_gates, exit_score)

    @classmethod
    def of_profile(cls, profile: Profile) -> ExitPolicy:
        return cls(profile.thresholds, profile.exit_score, profile.name)

    @property
    def all_closed(self) -> bool:
        return all(t == math.inf for t in self.thresholds)

    def opened(self) -> list[int]:
        """Indices of the exits this policy opens (a finite threshold)."""
        return [k for k, t in enumerate(self.thresholds) if t != math.inf]

    def leaves(self, k: int, outputs: torch.Tensor) -> torch.Tensor:
        """The exit rule, written once for the engine, the runtime and a cascade's heads: a sample leaves exit
        ``k`` when its score on ``outputs`` (margins or logits) reaches the threshold; a tie leaves."""
        return exit_score(outputs, self.exit_score) >= self.thresholds[k]

    def decide(self, gates: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> Decide:
        """This policy as the engine's decision at gate ``k``: ``None`` where the gate is closed (it is never
        called), else the gate's margins and who leaves."""

        def decide(k: int, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
            if self.thresholds[k] == math.inf:
                return None
            margins = gates[k](output)
            return margins, self.leaves(k, margins)

        return decide


class ExitPolicyOwner:
    """The thresholds, exit score and named profiles of a model with exits, owned as one :class:`ExitPolicy`.

    A subclass sets ``self._policy`` and ``self.profiles`` in ``__init__`` and gives ``num_gates``;
    it may check or adapt a profile before it is stored (:meth:`_accept_profile`) and name its exits
    for messages (:meth:`_exit_description`).
    """

    _policy: ExitPolicy
    profiles: dict[str, Profile]
    num_gates: int
    noun = "model"  # what messages call it: "this cascade has 4"

    @property
    def policy(self) -> ExitPolicy:
        """The policy the next call runs with (read it once; it never changes in place)."""
        return self._policy

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self._policy.thresholds

    @property
    def exit_score(self) -> str:
        """How gate outputs become one confidence per sample (``margin``, ``softmax``, ``entropy``)."""
        return self._policy.exit_score

    @property
    def active_profile(self) -> str | None:
        """The stored profile in force, or ``None`` when thresholds were set by hand."""
        return self._policy.profile

    def _exit_description(self) -> str:
        return "one per gate"

    def _accept_profile(self, profile: Profile) -> Profile:
        return profile

    def set_thresholds(self, thresholds: Sequence[float] | torch.Tensor, exit_score: str | None = None) -> None:
        """Set one threshold per exit (``inf`` closes it); takes effect on the next call."""
        values = thresholds.tolist() if isinstance(thresholds, torch.Tensor) else list(thresholds)
        if len(values) != self.num_gates:
            raise ValueError(f"expected {self.num_gates} thresholds ({self._exit_description()}), got {len(values)}")
        self._policy = ExitPolicy(tuple(values), exit_score or self._policy.exit_score)

    def close_gates(self) -> None:
        """Every exit closed: exactly the plain model."""
        self.set_thresholds([math.inf] * self.num_gates)

    def add_profile(self, profile: Profile, activate: bool = False) -> None:
        """Store a named threshold profile (replacing one of the same name)."""
        profile = self._accept_profile(profile)
        if len(profile.thresholds) != self.num_gates:
            raise ValueError(
                f"profile {profile.name!r} has {len(profile.thresholds)} thresholds; "
                f"this {self.noun} has {self.num_gates} ({self._exit_description()})"
            )
        self.profiles[profile.name] = profile
        if activate:
            self.use_profile(profile.name)

    def profile(self, name: str) -> Profile:
        """A stored profile by name; an unknown name raises ``KeyError`` listing the known ones."""
        return self.profiles[check_profile_name(name, self.profiles, f"this {self.noun}")]

    def use_profile(self, name: str) -> Profile:
        """Switch to a stored profile's thresholds and exit score, in one step."""
        profile = self.profile(name)
        self._policy = ExitPolicy.of_profile(profile)
        return profile

    def policy_for(self, choice: str | ExitPolicy | None = None) -> ExitPolicy:
        """The policy one call runs with: the one in force (``None``), a stored profile's (its name), or ``choice``.

        A policy whose length no longer matches the exits (a cascade member pruned after the
        cascade's thresholds were set) is refused rather than applied to the wrong exits.
        """
        if choice is None:
            policy = self._policy
        elif isinstance(choice, ExitPolicy):
            policy = choice
        else:
            policy = ExitPolicy.of_profile(self.profile(choice))
        if len(policy.thresholds) != self.num_gates:
            raise ValueError(
                f"the policy has {len(policy.thresholds)} thresholds; this {self.noun} has {self.num_gates} "
                f"({self._exit_description()}): set thresholds or calibrate again after changing its exits"
            )
        return policy

    def policy_to_save(self) -> tuple[ExitPolicy, list[Profile]]:
        """The policy in force and the stored profiles, read once for saving; a profile whose length no
        longer matches the exits is refused here, so no folder is written that cannot be loaded."""
        policy = self.policy_for()
        profiles = list(self.profiles.values())
        stale = [p.name for p in profiles if len(p.thresholds) != self.num_gates]
        if stale:
            raise ValueError(
                f"profile(s) {', '.join(stale)} no longer match this {self.noun}'s {self.num_gates} exits "
                f"({self._exit_description()}); calibrate again, or remove them from .profiles"
            )
        return policy, profiles

    # ---- state_dict: the policy travels as JSON bytes --------------------------------------------

    def _policy_state(self) -> dict[str, Any]:
        """The policy in force and the stored profiles, JSON-ready."""
        policy = self._policy
        return {
            "thresholds": encode_thresholds(policy.thresholds),
            "exit_score": policy.exit_score,
            "profiles": [p.to_dict() for p in self.profiles.values()],
            "active_profile": policy.profile,
        }

    def _load_policy_state(self, state: Mapping[str, Any]) -> None:
        """Profiles and the policy exactly as saved: the thresholds that ran, not the profile's re-read."""
        profiles = {p.name: p for p in (Profile.from_dict(d, self.num_gates) for d in state.get("profiles", []))}
        active = state.get("active_profile")
        if active is not None:
            check_profile_name(active, profiles, "the state dict")
        thresholds = decode_thresholds(state["thresholds"], self.num_gates)
        self.profiles = profiles
        self._policy = ExitPolicy(thresholds, state["exit_score"], active)


def state_tensor(state: Mapping[str, Any]) -> torch.Tensor:
    """JSON bytes in a uint8 tensor: every consumer of a state dict that expects tensors (safetensors,
    torch.jit, ONNX's exporter) handles it."""
    return torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8)


def state_from_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    return json.loads(tensor.cpu().numpy().tobytes().decode())
