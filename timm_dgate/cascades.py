"""``Cascade``: several timm classifiers, cheapest first, where each member's head is one more exit.

A sample runs member 0; it leaves at one of member 0's gates, or at its head when the head's
exit score reaches that exit's threshold; otherwise it runs member 1 with member 1's own gates,
and so on; the last member's head answers whatever reaches it. Exits are numbered in run
order (member 0's gates, member 0's head, member 1's gates, ...), one threshold per exit but
the last, so ``set_thresholds``, profiles, :func:`timm_dgate.calibrate` (one search over every
exit, ``timm_dgate.flops.CascadeCosts``) and :func:`timm_dgate.evaluate` work as on a
:class:`~timm_dgate.GatedModel`. Every member is a GatedModel inside (a plain timm classifier is
wrapped with no gates), so members run, cache features, fit and save through the same code.
Each member reads the batch resized to its own input size (``torch.nn.functional.interpolate``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import cascade_hub, hub
from .cache import FeatureCache, cache_features
from .calibration import ExitTable, calibrate, validation_cache
from .engine import ExitResult
from .errors import UnsupportedModelError
from .flops import CascadeCosts
from .model import GatedModel, _refuse_tracing, wrap
from .profiles import Profile, decode_thresholds
from .provenance import SeenImages, image_fingerprints
from .scores import check_exit_score, exit_score
from .training import FitReport, fit

DEFAULT_HEAD_SCORE = "softmax"  # max softmax between whole models, as Lebovitz et al. (TMLR 2023)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` at a member's ``(C, H, W)``: bilinear (antialiased when shrinking); channels must match."""
    if x.ndim != 4:
        raise ValueError(f"a cascade takes image batches (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != size[0]:
        raise ValueError(f"the batch has {x.shape[1]} channels; the member takes {size[0]} (input size {tuple(size)})")
    if tuple(x.shape[-2:]) == tuple(size[1:]):
        return x
    shrink = x.shape[-2] > size[1] or x.shape[-1] > size[2]
    return nn.functional.interpolate(x, size=tuple(size[1:]), mode="bilinear", align_corners=False, antialias=shrink)


def resized_batches(
    data: Iterable, size: Sequence[int], fingerprints: list[torch.Tensor] | None = None
) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(images, labels)`` batches of ``data`` resized for one member; the originals' fingerprints go to
    ``fingerprints`` if given (they tell passes over the data apart, and what the cascade has seen)."""
    for images, labels in data:
        if fingerprints is not None:
            fingerprints.append(image_fingerprints(images))
        yield resize(images, size), labels


class Cascade(nn.Module):
    """Members run cheapest first; each member's gates and head are exits (see the module doc).

    Use :func:`cascade` to make one. ``forward`` is a drop-in for the last member: logits in
    input order, each row from the exit where that sample left. With every exit closed (the
    start) it is exactly the last member's plain logits; in train mode no sample exits.
    """

    def __init__(self, members: Sequence[GatedModel], exit_score: str = DEFAULT_HEAD_SCORE):
        super().__init__()
        check_members(members)
        self.members = nn.ModuleList(members)
        self.head_score = check_exit_score(exit_score)
        self._head_thresholds: list[float] = [math.inf] * (len(members) - 1)
        self.profiles: dict[str, Profile] = {}
        self.active_profile: str | None = None
        self.seen_images = SeenImages()  # original images fit and evaluate read (members keep their own too)
        self._last_pass: torch.Tensor | None = None  # fingerprints of the images the last caching pass read
        self.close_gates()
        self.train(any(m.training for m in members))  # the members' mode (eval: exits run), as a GatedModel does

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
    def exit_score(self) -> str:
        """How a member's head logits become a confidence (gates keep their member's own score)."""
        return self.head_score

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

    # ---- thresholds and profiles -------------------------------------------------------------

    @property
    def thresholds(self) -> tuple[float, ...]:
        """One per exit in run order (members' gates and heads but the last); ``inf`` closes one."""
        out: list[float] = []
        for i, member, _ in self._spans():
            out += member.thresholds
            if i < len(self.members) - 1:
                out.append(self._head_thresholds[i])
        return tuple(out)

    def set_thresholds(self, thresholds: Sequence[float] | torch.Tensor, exit_score: str | None = None) -> None:
        """Set one threshold per exit (``inf`` closes it); ``exit_score`` is the heads' score."""
        values = thresholds.tolist() if isinstance(thresholds, torch.Tensor) else list(thresholds)
        if len(values) != self.num_gates:
            raise ValueError(
                f"expected {self.num_gates} thresholds (one per exit but the last member's head: "
                f"{', '.join(self.exit_names[:-1])}), got {len(values)}"
            )
        values = list(decode_thresholds(values))
        if exit_score is not None:
            self.head_score = check_exit_score(exit_score)
        for i, member, start in self._spans():
            member.set_thresholds(values[start : start + member.num_gates])
            if i < len(self.members) - 1:
                self._head_thresholds[i] = values[start + member.num_gates]
        self.active_profile = None

    def close_gates(self) -> None:
        """Every exit closed: the cascade is exactly its last member's plain model."""
        self.set_thresholds([math.inf] * self.num_gates)

    def add_profile(self, profile: Profile, activate: bool = False) -> None:
        """Store a named profile (one threshold per exit), replacing one of the same name."""
        if len(profile.thresholds) != self.num_gates:
            raise ValueError(
                f"profile {profile.name!r} has {len(profile.thresholds)} thresholds; this cascade has "
                f"{self.num_gates} exits with one"
            )
        self.profiles[profile.name] = profile
        if activate:
            self.use_profile(profile.name)

    def use_profile(self, name: str) -> Profile:
        """Switch to a stored profile's thresholds and head score."""
        if name not in self.profiles:
            raise KeyError(f"unknown profile {name!r}; this cascade has: {', '.join(self.profiles) or 'none'}")
        profile = self.profiles[name]
        self.set_thresholds(profile.thresholds, profile.exit_score)
        self.active_profile = name
        return profile

    # ---- running -------------------------------------------------------------------------------

    def _runs(self, i: int) -> bool:
        """Whether member ``i`` runs at all: the last always does, another only with an exit open."""
        member = self.members[i]
        if i == len(self.members) - 1:
            return True
        return self._head_thresholds[i] != math.inf or any(t != math.inf for t in member.thresholds)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last member's plain logits (no exits), the batch resized to it: what profiles are measured against."""
        return self.members[-1].plain_forward(resize(x, self.members[-1].input_size))

    def forward(self, x: torch.Tensor, return_exits: bool = False) -> torch.Tensor | ExitResult:
        """Logits with early exits; with ``return_exits`` also each sample's exit (``num_gates`` = last head).

        A sample that leaves at a member never runs the later members; when none is left they
        do not run at all. Rows come back in input order.
        """
        if self.training or all(t == math.inf for t in self.thresholds):
            logits = self.plain_forward(x)
            if not return_exits:
                return logits
            return ExitResult(logits, torch.full((len(logits),), self.num_gates, dtype=torch.long, device=x.device))
        _refuse_tracing()
        alive = torch.arange(x.shape[0], device=x.device)
        pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for i, member, start in self._spans():
            if not self._runs(i):
                continue
            batch = x if len(alive) == x.shape[0] else x[alive]
            out = member(resize(batch, member.input_size), return_exits=True)
            exits = out.exits + start
            if i == len(self.members) - 1:
                pieces.append((alive, out.logits, exits))
                break
            stay = exits == start + member.num_gates  # reached the head
            threshold = self._head_thresholds[i]
            if threshold != math.inf:
                stay &= exit_score(out.logits, self.head_score) < threshold
            pieces.append((alive[~stay], out.logits[~stay], exits[~stay]))
            alive = alive[stay]
            if not len(alive):
                break
        result = _in_input_order(pieces, x.shape[0], x.device)
        return result if return_exits else result.logits

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
        kind = check_exit_score(exit_score or self.head_score)
        scores, correct = [], []
        for i, member in enumerate(self.members):
            table = ExitTable.from_cache(member, caches[i])
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

    # ---- Hub I/O (format in docs/cascades.md) --------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *, card_repo_id: str | None = None) -> Path:
        """Write the cascade manifest, its profiles and model card, and one member folder each.

        A member folder is a GatedModel folder (docs/hub.md), so ``timm.create_model("local-dir:...")``
        or ``"hf-hub:<repo>/member0"``-style loading of its backbone works as for any gated model;
        a member made with ``base_model`` names its backbone's Hub id instead of storing it.
        """
        folder = Path(save_directory)
        for i, member in enumerate(self.members):
            member.save_pretrained(folder / cascade_hub.member_folder(i))
        return cascade_hub.write_manifest(
            folder,
            [m.config for m in self.members],
            self.head_score,
            list(self.profiles.values()),
            hub.saved_state(self.thresholds, self.active_profile),
            card_repo_id,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload cascade with timm_dgate",
        token: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Save as in :meth:`save_pretrained` and commit the folder, member folders included, in one commit."""
        return hub.push_folder(
            lambda folder, repo: self.save_pretrained(folder, card_repo_id=repo),
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, profile: str | None = None, **options: Any) -> Cascade:
        """Load a cascade from a local folder (Hub repos: :func:`timm_dgate.from_pretrained`), in eval mode.

        ``options`` (``cache_dir``, ``token``, ``local_files_only``) reach members whose backbone
        is named by a Hub id.
        """
        folder = Path(folder)
        manifest = cascade_hub.read_manifest(folder)
        if profile is not None and profile not in {p.name for p in manifest.profiles}:
            known = ", ".join(p.name for p in manifest.profiles) or "none"
            raise KeyError(f"unknown profile {profile!r} in {folder}; it has: {known}")
        members = [GatedModel.from_pretrained(folder / name, **options) for name in manifest.members]
        model = cls(members, manifest.exit_score)
        for p in manifest.profiles:
            model.add_profile(p)
        model.set_thresholds(manifest.thresholds, manifest.exit_score)
        active = profile or manifest.active_profile
        if active is not None:
            model.use_profile(active)
        return model.eval()

    def extra_repr(self) -> str:
        return f"exits={len(self.exit_names)}, head_score={self.head_score}"


def exit_score_rows(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """A head's exit scores ``(1, N)`` in float64, as :class:`~timm_dgate.ExitTable` holds a gate's."""
    return exit_score(logits, kind).double().unsqueeze(0)


def _in_input_order(
    pieces: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], batch: int, device: torch.device
) -> ExitResult:
    """Logits and exits of every member's leavers put back at their input rows."""
    if len(pieces) == 1 and len(pieces[0][0]) == batch:
        return ExitResult(pieces[0][1], pieces[0][2])  # everyone left at one member, in input order
    dtype = pieces[-1][1].dtype
    for _, logits, _ in pieces:
        dtype = torch.promote_types(dtype, logits.dtype)
    logits = torch.empty((batch, pieces[-1][1].shape[1]), dtype=dtype, device=device)
    exits = torch.empty(batch, dtype=torch.long, device=device)
    for rows, values, where in pieces:
        logits[rows] = values.to(dtype)
        exits[rows] = where
    return ExitResult(logits, exits)


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
            wrapped.append(wrap(member, [], input_size=size))
    return Cascade(wrapped, exit_score)


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    profile: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    **gated_options: Any,
) -> GatedModel | Cascade:
    """Load what ``save_pretrained`` / ``push_to_hub`` wrote: a :class:`Cascade` where the folder or repo has
    a cascade manifest, else a :class:`~timm_dgate.GatedModel` (``gated_options``: its ``model=``).

    Arguments as :meth:`GatedModel.from_pretrained <timm_dgate.GatedModel.from_pretrained>`.
    """
    options = dict(cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    path = Path(name_or_path)
    if path.is_dir():
        if cascade_hub.is_cascade(path):
            if revision is not None:
                raise ValueError(f"revision={revision!r} applies to Hub repos, not to the local folder {path}")
            return Cascade.from_pretrained(path, profile=profile, **options)
    elif not (path.exists() or str(name_or_path).startswith((".", "/", "~"))):
        folder = hub.snapshot(str(name_or_path), cascade_hub.HUB_PATTERNS, revision, **options)
        if cascade_hub.is_cascade(folder):
            return Cascade.from_pretrained(folder, profile=profile, **options)
    return GatedModel.from_pretrained(name_or_path, revision=revision, profile=profile, **options, **gated_options)
