"""``Cascade``: several timm classifiers, cheapest first, where each member's head is one more exit.

A sample runs member 0; it leaves at one of member 0's gates, or at its head when the head's
exit score reaches that exit's threshold; otherwise it runs member 1 with member 1's own gates,
and so on; the last member's head answers whatever reaches it. Exits are numbered in run
order (member 0's gates, member 0's head, member 1's gates, ...), one threshold per exit but
the last, so ``set_thresholds``, profiles, :func:`timm_dgate.calibrate` (one search over every
exit, ``timm_dgate.core.costs.CascadeCosts``) and :func:`timm_dgate.evaluate` work as on a
:class:`~timm_dgate.GatedModel`. Every member is a GatedModel inside (a plain timm classifier is
wrapped with no gates), so members run, cache features, fit and save through the same code.
Each member reads the batch resized to its own input size (``torch.nn.functional.interpolate``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..boundaries.probe import default_input_size
from ..calibration.calibrate import calibrate, validation_cache
from ..core.cache import FeatureCache, cache_features
from ..core.costs import CascadeCosts
from ..core.engine import ExitResult, assemble
from ..core.exit_table import ExitTable
from ..core.policy import ExitPolicy, ExitPolicyOwner, state_from_tensor, state_tensor
from ..core.profiles import Profile
from ..core.provenance import SeenImages
from ..core.scores import check_exit_score, exit_score
from ..errors import UnsupportedModelError
from ..fitting.training import FitReport, fit
from .cascade_io import CascadeHubMixin
from .gated import GatedModel, wrap
from .pushing import PushToHubMixin
from .resize import resize, resized_batches
from .tracing import refuse_tracing

DEFAULT_HEAD_SCORE = "softmax"  # max softmax between whole models, as Lebovitz et al. (TMLR 2023)


class Cascade(CascadeHubMixin, PushToHubMixin, ExitPolicyOwner, nn.Module):
    """Members run cheapest first; each member's gates and head are exits (see the module doc).

    Use :func:`cascade` to make one. ``forward`` is a drop-in for the last member: logits in
    input order, each row from the exit where that sample left. With every exit closed (the
    start) it is exactly the last member's plain logits; in train mode no sample exits.
    """

    default_commit_message = "Upload cascade with timm_dgate"
    noun = "cascade"

    def __init__(self, members: Sequence[GatedModel], exit_score: str = DEFAULT_HEAD_SCORE):
        super().__init__()
        check_members(members)
        self.members = nn.ModuleList(members)
        self._policy = ExitPolicy.closed(self.num_gates, exit_score)
        self.profiles: dict[str, Profile] = {}
        self.seen_images = SeenImages()  # original images fit and evaluate read (members keep their own too)
        self._last_pass: torch.Tensor | None = None  # fingerprints of the images the last caching pass read
        self.train(members_mode(members))  # the members' mode (eval: exits run), as a GatedModel does

    # ---- what the cascade is ---------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def num_gates(self) -> int:
        """Thresholded exits: every member's gates and every head but the last (``num_gates`` = the final head)."""
        return sum(m.num_gates + 1 for m in self.members) - 1

    @property
    def input_sizes(self) -> list[tuple[int, int, int]]:
        """Each member's ``(C, H, W)``; the batch is resized to it for that member."""
        return [m.input_size for m in self.members]

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The last member's: the size a batch needs no resizing at for the member that answers most."""
        return self.members[-1].input_size

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The last member's preprocessing at :attr:`input_size`, so ``timm.data.resolve_model_data_config(cascade)``
        gives what the cascade takes (each member resizes the batch itself; normalisation is shared)."""
        return {**self.members[-1].pretrained_cfg, "input_size": self.input_size}

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @property
    def exit_names(self) -> list[str]:
        """Exits in run order: ``"<member>:<architecture>.<gate or head>"``."""
        names = []
        for i, member in enumerate(self.members):
            prefix = f"{i}:{member.config.architecture}"
            names += [f"{prefix}.{b.name}" for b in member.boundaries] + [f"{prefix}.head"]
        return names

    def _spans(self) -> Iterator[tuple[int, GatedModel, int]]:
        """Per member: its index, itself, and the number of its first exit."""
        start = 0
        for i, member in enumerate(self.members):
            yield i, member, start
            start += member.num_gates + 1

    @property
    def costs(self) -> CascadeCosts:
        """FLOPs per image of every exit (each member counted once, at its own input size)."""
        return CascadeCosts(tuple(m.costs for m in self.members))

    # ---- the exit policy (one threshold per exit, the heads' score) --------------------------

    def _exit_description(self) -> str:
        return f"one per exit but the last member's head: {', '.join(self.exit_names[:-1])}"

    # ---- running -------------------------------------------------------------------------------

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last member's plain logits (no exits), the batch resized to it: what profiles are measured against."""
        return self.members[-1].plain_forward(resize(x, self.members[-1].input_size))

    def forward(
        self, x: torch.Tensor, return_exits: bool = False, profile: str | ExitPolicy | None = None
    ) -> torch.Tensor | ExitResult:
        """Logits with early exits; with ``return_exits`` also each sample's exit (``num_gates`` = last head).

        ``profile``: a stored profile's name or an ``ExitPolicy`` for this call alone; default: the
        policy in force, read once here and handed to each member as its share (the members' own
        policies are never read or changed). A sample that leaves at a member never runs the later
        members; when none is left they do not run at all. Rows come back in input order.
        """
        policy = self.policy_for(profile)
        if self.training or policy.all_closed:
            logits = self.plain_forward(x)
            if not return_exits:
                return logits
            return ExitResult(logits, torch.full((len(logits),), self.num_gates, dtype=torch.long, device=x.device))
        refuse_tracing()
        alive = torch.arange(x.shape[0], device=x.device)
        pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        last = len(self.members) - 1
        for i, member, start in self._spans():
            gates = ExitPolicy(policy.thresholds[start : start + member.num_gates], member.config.exit_score)
            head = policy.thresholds[start + member.num_gates] if i < last else math.inf
            if i < last and head == math.inf and gates.all_closed:
                continue  # no exit open here: the member would only pass everyone on
            batch = x if len(alive) == x.shape[0] else x[alive]
            out = member(resize(batch, member.input_size), return_exits=True, profile=gates)
            exits = out.exits + start
            if i == last:
                pieces.append((alive, out.logits, exits))
                break
            stay = exits == start + member.num_gates  # reached the head
            if head != math.inf:
                stay &= ~policy.leaves(start + member.num_gates, out.logits)
            pieces.append((alive[~stay], out.logits[~stay], exits[~stay]))
            alive = alive[stay]
            if not len(alive):
                break
        result = assemble(x.shape[0], pieces, x.device)
        return result if return_exits else result.logits

    def get_extra_state(self) -> torch.Tensor:
        """The cascade's own policy and profiles travel in ``state_dict()`` beside the members' state."""
        return state_tensor({"exits": self.exit_names, **self._policy_state()})

    def set_extra_state(self, state: torch.Tensor) -> None:
        values = state_from_tensor(state)
        if list(values.get("exits", [])) != self.exit_names:
            raise ValueError(
                f"this state dict is for a cascade with exits {values.get('exits')}; this one has {self.exit_names}"
            )
        self._load_policy_state(values)

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError("timm_dgate: torch.jit.script cannot capture a cascade's data-dependent exits")

    # ---- fitting and calibration ------------------------------------------------------------

    def cache_features(
        self, data: Iterable, split: str, members: Sequence[int] | None = None, progress: bool = True
    ) -> list[FeatureCache]:
        """One pass per member (``members``: which; default all) over ``data``, resized for each: its feature cache.

        The passes must see the same images in the same order (a loader without shuffling), so
        that row ``n`` is one image in every cache; a loader that reorders is refused.
        """
        chosen = list(range(len(self.members))) if members is None else list(members)
        caches, passes = [], []
        for i in chosen:
            seen: list[torch.Tensor] = []
            member = self.members[i]
            caches.append(
                cache_features(member, resized_batches(data, member.input_size, seen), split=split, progress=progress)
            )
            passes.append(torch.cat(seen))
        if any(not torch.equal(p, passes[0]) for p in passes[1:]):
            raise ValueError(
                f"the {split} data gave other images or another order on another pass: a cascade caches one pass "
                "per member and lines their rows up, so use a loader without shuffling (shuffle=False)"
            )
        self._last_pass = passes[0] if passes else None
        return caches

    def fit(self, data: Iterable, **fit_options: Any) -> list[FitReport | None]:
        """Fit every gated member's gates (:func:`timm_dgate.fit`, ``fit_options``), one caching pass each.

        Members without gates only answer at their heads and are left as they are (``None``).
        """
        gated = [i for i, member in enumerate(self.members) if member.num_gates]
        progress = bool(fit_options.get("progress", True))
        caches = dict(zip(gated, self.cache_features(data, "train", gated, progress=progress))) if gated else {}
        if gated:
            self.seen_images.record_fit(self._last_pass)
        return [
            fit(self.members[i], caches[i], **fit_options) if i in caches else None for i in range(len(self.members))
        ]

    def exit_table(self, caches: Sequence[FeatureCache], exit_score: str | None = None) -> ExitTable:
        """Every exit's score and correctness on per-member caches of the same images (rows in exit order)."""
        if len(caches) != len(self.members):
            raise ValueError(f"expected {len(self.members)} caches (one per member), got {len(caches)}")
        if any(not torch.equal(c.labels, caches[0].labels) for c in caches[1:]):
            raise ValueError("the members' caches hold other labels: they must come from the same images in one order")
        kind = check_exit_score(exit_score or self.exit_score)
        scores, correct = [], []
        for i, member in enumerate(self.members):
            table = ExitTable.from_cache(member, caches[i], member.config.exit_score)
            scores.append(table.scores)
            correct.append(table.correct)
            if i < len(self.members) - 1:
                scores.append(exit_score_rows(caches[i].logits, kind))
        return ExitTable(torch.cat(scores), torch.cat(correct), self.costs)

    def validation_table(self, data: Any, exit_score: str | None = None) -> tuple[ExitTable, str]:
        """What :func:`timm_dgate.calibrate` searches: ``data`` is a loader (one pass per member) or the
        members' validation caches (:meth:`cache_features` with ``split="validation"``)."""
        if isinstance(data, FeatureCache):
            raise ValueError("a cascade calibrates on one validation cache per member: cascade.cache_features(...)")
        if isinstance(data, (list, tuple)) and all(isinstance(c, FeatureCache) for c in data):
            caches = list(data)
        else:
            caches = self.cache_features(data, "validation")
            self.seen_images.check_calibration(self._last_pass)
        caches = [validation_cache(m, c) for m, c in zip(self.members, caches)]
        return self.exit_table(caches, exit_score), caches[0].split

    def calibrate(self, data: Any, **target: Any) -> Profile:
        """One threshold search over every exit of every member; see :func:`timm_dgate.calibrate`."""
        return calibrate(self, data, **target)

    def extra_repr(self) -> str:
        return f"exits={len(self.exit_names)}, head_score={self.exit_score}"


def exit_score_rows(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """A head's exit scores ``(1, N)`` in float64, as :class:`~timm_dgate.ExitTable` holds a gate's."""
    return exit_score(logits, kind).double().unsqueeze(0)


def check_members(members: Sequence[nn.Module]) -> None:
    """Two or more distinct gated members with the same classes and input channels, or a clear error."""
    if len(members) < 2:
        raise ValueError(f"a cascade needs at least two members, cheapest first; got {len(members)}")
    for i, member in enumerate(members):
        if not isinstance(member, GatedModel):
            raise TypeError(f"member {i} is a {type(member).__name__}, not a GatedModel (use timm_dgate.cascade())")
    classes = [m.num_classes for m in members]
    if len(set(classes)) != 1:
        raise ValueError(f"the members must have the same classes; their num_classes are {classes}")
    channels = [m.input_size[0] for m in members]
    if len(set(channels)) != 1:
        raise ValueError(f"the members must take the same input channels (one batch feeds them all); got {channels}")
    if len({id(m.base_model) for m in members}) != len(members):
        raise ValueError("the same model is in the cascade twice: each member must be a model of its own")


def members_mode(members: Sequence[nn.Module]) -> bool:
    """The one train/eval mode of all members; mixed modes are refused, since a cascade in train mode runs
    no exit and one in eval mode would silently run a train-mode member's BatchNorm on batch statistics."""
    training = [i for i, m in enumerate(members) if m.training]
    if training and len(training) < len(members):
        raise ValueError(
            f"member(s) {training} are in train mode and the others in eval mode: call .eval() on every "
            "member (timm creates models in train mode) or .train() on all of them"
        )
    return bool(training)


def cascade(
    members: Sequence[nn.Module],
    *,
    input_sizes: Sequence[Sequence[int] | None] | None = None,
    exit_score: str = DEFAULT_HEAD_SCORE,
) -> Cascade:
    """Chain timm classifiers, cheapest first, into one model whose members' heads are exits too.

    Args:
        members: timm classifiers or :class:`~timm_dgate.GatedModel` s, all with the same classes.
            A plain classifier has no gates of its own, only its head as an exit; wrap it first
            (:func:`timm_dgate.wrap`) to give it gates.
        input_sizes: per member ``(C, H, W)`` for plain classifiers (default: their pretrained
            config); a GatedModel keeps its own. Each member reads the batch resized to its size.
        exit_score: how a member's head logits become a confidence (``softmax``, ``margin``,
            ``entropy``); the gates keep their member's own score.

    Every exit starts closed: the cascade gives the last member's plain logits until thresholds
    are set or calibrated (:meth:`Cascade.calibrate`).
    """
    if isinstance(members, nn.Module) or not isinstance(members, Sequence):
        raise TypeError("timm_dgate.cascade takes a list of models, cheapest first: cascade([small, big])")
    sizes = list(input_sizes) if input_sizes is not None else [None] * len(members)
    if len(sizes) != len(members):
        raise ValueError(f"{len(sizes)} input sizes for {len(members)} members")
    wrapped = []
    for i, (member, size) in enumerate(zip(members, sizes)):
        if isinstance(member, Cascade):
            raise UnsupportedModelError("Cascade", "a cascade cannot be a member; list its members instead")
        if isinstance(member, GatedModel):
            if size is not None and tuple(size) != member.input_size:
                raise ValueError(f"member {i} is a GatedModel at input size {member.input_size}, not {tuple(size)}")
            wrapped.append(member)
        else:
            channels = default_input_size(member)[0]
            if size is not None and size[0] != channels:
                raise ValueError(f"input_sizes[{i}] is {tuple(size)}, but member {i} takes {channels} channels")
            wrapped.append(wrap(member, [], input_size=size))
    return Cascade(wrapped, exit_score)

