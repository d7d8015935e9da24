"""Threshold calibration on validation data: a target accuracy at the lowest average FLOPs.

Everything runs on a validation cache (every gate's exit score and prediction, and the
head's, for every sample), so a search costs no backbone passes. Two searches:

- ``sequential``: the paper's. Gate by gate in network order, each gate gets the threshold
  that best meets the target with the later gates still closed.
- ``coordinate``: starts from the sequential answer and keeps re-optimising one gate at a
  time, given all the others, until nothing improves. Every move is to a candidate at least
  as good as the current one, so it is never worse than sequential on the same cache.

Each single-gate move evaluates every distinct threshold of that gate at once with sorted
cumulative sums, so a search costs no backbone pass and little time. It runs on one thread:
its tensors are small, and on a busy machine extra threads only wait for each other.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING

import torch

from .cache import FeatureCache, cache_features, check_labels
from .errors import CalibrationError, ChanceAccuracyError
from .flops import CascadeCosts, GateCosts
from .profiles import Profile
from .scores import check_exit_score, exit_score

if TYPE_CHECKING:
    from .model import GatedModel

SEARCHES = ("sequential", "coordinate")


@dataclass(frozen=True)
class Target:
    """What a profile must meet: an absolute accuracy, a drop from the plain model, or a FLOPs budget.

    ``confidence``: the probability with which an accuracy target must hold on new data.
    """

    min_accuracy: float | None = None
    max_drop: float | None = None
    max_gflops: float | None = None
    confidence: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.min_accuracy, self.max_drop, self.max_gflops) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one target: min_accuracy, max_drop or max_gflops")
        for name in ("max_drop", "min_accuracy"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(
                    f"{name} is a fraction in [0, 1), got {value}: 0.005 is half a point, 0.9 is 90%"
                )
        if self.max_gflops is not None and not self.max_gflops > 0:
            raise ValueError(f"max_gflops must be positive, got {self.max_gflops}")
        if self.confidence is not None:
            if self.max_gflops is not None:
                raise ValueError("confidence applies to accuracy targets (max_drop, min_accuracy), not max_gflops")
            if not 0.5 <= self.confidence < 1:
                raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")

    @property
    def z(self) -> float:
        """Standard errors the accuracy estimate must clear the target by (0 without ``confidence``)."""
        return NormalDist().inv_cdf(self.confidence) if self.confidence else 0.0

    def describe(self) -> str:
        sure = f" with {100 * self.confidence:g}% confidence" if self.confidence else ""
        if self.max_drop is not None:
            return f"accuracy >= plain - {100 * self.max_drop:.2f} pt{sure}"
        if self.min_accuracy is not None:
            return f"accuracy >= {100 * self.min_accuracy:.2f}%{sure}"
        return f"<= {self.max_gflops:g} GFLOPs"


@dataclass
class ExitTable:
    """Validation outcome of exiting at each gate (rows 0..K-1) or the head (row K).

    ``scores``: ``(K, N)`` exit scores; ``correct``: ``(K + 1, N)`` whether that exit's
    prediction is right; ``costs``: the model's FLOPs per exit (a cascade's exits: its members'
    gates and heads, :class:`~timm_dgate.flops.CascadeCosts`).
    """

    scores: torch.Tensor
    correct: torch.Tensor
    costs: GateCosts | CascadeCosts

    @classmethod
    def from_cache(cls, model: GatedModel, cache: FeatureCache, score: str | None = None) -> ExitTable:
        kind = check_exit_score(score or model.exit_score)
        margins = cache.margins(model.gates)
        scores = torch.stack([exit_score(m, kind) for m in margins]).double() if margins else (
            torch.empty((0, len(cache.labels)), dtype=torch.float64)  # no gates: a cascade member's head only
        )
        predictions = [m.argmax(1) for m in margins] + [cache.logits.argmax(1)]
        correct = torch.stack([p == cache.labels for p in predictions])
        return cls(scores, correct, model.costs)

    @property
    def num_gates(self) -> int:
        return self.scores.shape[0]

    def rows(self, index: torch.Tensor) -> ExitTable:
        """The table restricted to the samples ``index``."""
        return ExitTable(self.scores[:, index], self.correct[:, index], self.costs)

    @property
    def plain_accuracy(self) -> float:
        return self.correct[-1].double().mean().item()

    def exits(self, thresholds: tuple[float, ...]) -> torch.Tensor:
        """Exit index per sample (``K`` = head) under ``thresholds``."""
        leave = self.scores >= torch.tensor(thresholds, dtype=torch.float64).unsqueeze(1)
        leave = torch.cat([leave, torch.ones_like(leave[:1])])
        return leave.to(torch.int8).argmax(0)

    def evaluate(self, thresholds: tuple[float, ...]) -> tuple[float, float, torch.Tensor]:
        """Accuracy, average GFLOPs and exit fraction per exit (gates then head) of ``thresholds``."""
        exits = self.exits(thresholds)
        accuracy = self.correct.gather(0, exits.unsqueeze(0)).double().mean().item()
        gflops = self.costs.average(exits, thresholds) / 1e9
        fractions = torch.bincount(exits, minlength=self.num_gates + 1).double() / exits.numel()
        return accuracy, gflops, fractions


@dataclass(frozen=True)
class _Goal:
    """What a search minimises: ``kind`` is ``correct`` (a floor on correct answers), ``flops``
    (a ceiling on total FLOPs) or ``price`` (the trade-off ``flops - bound * correct``).

    With ``z > 0`` a ``correct`` floor must be cleared by the lower confidence bound
    ``correct - z * sqrt(changed - (correct - reference)^2 / n)``: ``changed`` counts samples
    whose correctness differs from the reference's (the plain model's for a drop target,
    always-wrong for an absolute one), which makes that the paired standard error times n.
    """

    kind: str
    bound: float
    changed: torch.Tensor  # (K + 1, N): correctness at that exit differs from the reference
    z: float = 0.0
    reference: float = 0.0  # correct answers of the reference

    def assured(self, correct: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        """Correct answers the target counts: the lower confidence bound with ``z``, else the count itself."""
        if not self.z:
            return correct
        n = self.changed.shape[1]
        spread = (changed - (correct - self.reference).square() / n).clamp_min(0).sqrt()
        return correct - self.z * spread

    def shortfall(self, correct: torch.Tensor, changed: torch.Tensor, flops: torch.Tensor) -> torch.Tensor:
        """How far the target is missed (0 where it is met): correct answers short, or FLOPs over."""
        if self.kind == "correct":
            return (self.bound - self.assured(correct, changed)).clamp_min(0)
        if self.kind == "flops":
            return (flops - self.bound).clamp_min(0)
        return torch.zeros_like(flops)

    def rank(self, correct: torch.Tensor, changed: torch.Tensor, flops: torch.Tensor) -> torch.Tensor:
        """Lexicographic key (violation, objective) folded into one float64: lower is better."""
        if self.kind == "price":
            return flops - self.bound * correct
        if self.kind == "correct":
            return self.shortfall(correct, changed, flops) * 1e30 + flops
        return self.shortfall(correct, changed, flops) * 1e6 - correct


def _goal(table: ExitTable, target: Target) -> _Goal:
    n = table.scores.shape[1]
    if target.max_gflops is not None:
        return _Goal("flops", target.max_gflops * 1e9 * n, table.correct)
    if target.max_drop is not None:
        reference = table.correct[-1]
        needed = table.plain_accuracy - target.max_drop
    else:
        reference = torch.zeros_like(table.correct[-1])
        needed = target.min_accuracy
    changed = table.correct != reference
    return _Goal("correct", math.ceil(needed * n - 1e-9), changed, target.z, reference.double().sum().item())


def _price_optima(table: ExitTable, count: int, max_rounds: int) -> list[list[float]]:
    """Thresholds minimising ``FLOPs - price * correct`` for ``count`` prices from 1e-3 to 1e2 backbones."""
    optima = []
    for i in range(count):
        price = table.costs.backbone * 10 ** (-3 + 5 * i / max(1, count - 1))
        optima.append(_descend(table, [math.inf] * table.num_gates, _Goal("price", price, table.correct), max_rounds))
    return optima


def _best_for_gate(table: ExitTable, thresholds: list[float], k: int, goal: _Goal) -> tuple[float, float]:
    """Best threshold for gate ``k`` with the others fixed, and its rank; closing the gate included."""
    closed = [*thresholds[:k], math.inf, *thresholds[k + 1 :]]
    closed_rank = _rank_of(table, closed, goal)
    n = table.scores.shape[1]
    idx = torch.arange(n)
    exits_before = table.exits(tuple(thresholds[:k] + [math.inf] * (table.num_gates - k)))
    reach = exits_before == table.num_gates
    if not reach.any():
        return math.inf, closed_rank
    costs = table.costs.exit_costs(
        [t != math.inf for t in closed[:k]] + [True] + [t != math.inf for t in closed[k + 1 :]]
    )
    rest_exit = table.exits(tuple(closed))[reach]  # where each reaching sample ends if it passes gate k
    order = torch.argsort(table.scores[k, reach], descending=True)
    s = table.scores[k, reach][order]
    zero = torch.zeros(1, dtype=torch.float64)

    def totals(per_exit: torch.Tensor) -> torch.Tensor:
        """Sum over samples of ``per_exit[exit, sample]`` when the j highest scores leave at gate k, for every j."""
        fixed = per_exit[exits_before[~reach], idx[~reach]].double().sum()  # earlier exits do not depend on k
        leave = per_exit[k, reach][order].double()
        stay = per_exit[rest_exit, idx[reach]][order].double()
        return fixed + torch.cat([zero, leave.cumsum(0)]) + stay.sum() - torch.cat([zero, stay.cumsum(0)])

    per_exit_flops = costs.unsqueeze(1).expand(-1, n)
    # a threshold splits only between distinct scores; j = 0 (open, nobody exits) never beats closed
    valid = torch.zeros(len(s) + 1, dtype=torch.bool)
    valid[1:-1] = s[:-1] > s[1:]
    valid[-1] = True
    ranks = goal.rank(totals(table.correct), totals(goal.changed), totals(per_exit_flops))
    ranks = ranks.masked_fill(~valid, math.inf)
    best = int(torch.argmin(ranks))
    if ranks[best].item() >= closed_rank:
        return math.inf, closed_rank
    threshold = -math.inf if best == len(s) else float((s[best - 1] + s[best]) / 2)
    return threshold, ranks[best].item()


def _totals(table: ExitTable, thresholds: list[float] | tuple[float, ...], goal: _Goal) -> tuple[torch.Tensor, ...]:
    """Correct answers, changed answers and FLOPs summed over the samples, each as a 1-element tensor."""
    exits = table.exits(tuple(thresholds)).unsqueeze(0)
    correct = table.correct.gather(0, exits).double().sum()
    changed = goal.changed.gather(0, exits).double().sum()
    flops = table.costs.exit_costs([t != math.inf for t in thresholds])[exits].sum()
    return correct.reshape(1), changed.reshape(1), flops.reshape(1)


def _rank_of(table: ExitTable, thresholds: list[float], goal: _Goal) -> float:
    return goal.rank(*_totals(table, thresholds, goal)).item()


def _check_met(table: ExitTable, thresholds: tuple[float, ...], goal: _Goal, target: Target) -> None:
    """Raise :class:`CalibrationError` naming the best reachable value when ``thresholds`` miss the target."""
    correct, changed, flops = _totals(table, thresholds, goal)
    if goal.shortfall(correct, changed, flops).item() <= 1e-9:
        return
    n = table.scores.shape[1]
    if goal.kind == "flops":
        best = f"the cheapest reachable is {flops.item() / n / 1e9:.4g} GFLOPs per image"
    else:
        bound = " (lower confidence bound)" if goal.z else ""
        best = f"the best reachable accuracy{bound} is {goal.assured(correct, changed).item() / n:.4f}"
    raise CalibrationError(
        f"cannot meet {target.describe()} on this validation data ({n} images): {best}; "
        f"the plain model's is {table.plain_accuracy:.4f}. Nothing was activated."
    )


def _descend(table: ExitTable, thresholds: list[float], goal: _Goal, max_rounds: int) -> list[float]:
    """Coordinate descent: re-optimise one gate at a time until no single move improves the rank."""
    thresholds = list(thresholds)
    current = _rank_of(table, thresholds, goal)
    for _ in range(max_rounds):
        improved = False
        for k in range(table.num_gates):
            candidate, rank = _best_for_gate(table, thresholds, k, goal)
            if rank < current - 1e-9:
                thresholds[k], current, improved = candidate, rank, True
        if not improved:
            break
    return thresholds


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def search_thresholds(
    table: ExitTable, target: Target, method: str = "coordinate", max_rounds: int = 10, prices: int = 8
) -> tuple[float, ...]:
    """Thresholds that meet ``target`` on ``table`` at the lowest average FLOPs (see module doc).

    ``coordinate`` descends from the sequential answer and from the optima of ``prices``
    trade-offs ``FLOPs - price * correct`` (which spread the accuracy budget over all gates
    instead of spending it at the first), and keeps the best; never worse than sequential.
    With ``target.confidence`` the data is split in two halves, one to propose and one to test
    (:func:`_search_then_test`), so that the bound holds for the thresholds chosen.
    Raises :class:`~timm_dgate.CalibrationError` when no thresholds meet the target.
    """
    if method not in SEARCHES:
        raise ValueError(f"unknown search {method!r}; expected one of {SEARCHES}")
    if target.confidence is not None:
        return _search_then_test(table, target, method, max_rounds, prices)
    thresholds = _search(table, _goal(table, target), method, max_rounds, prices)
    _check_met(table, thresholds, _goal(table, target), target)
    return thresholds


# Candidates of a confident search: accuracy floors on the search half from 3 points above the
# target to 1 point below it, in quarter points, strictest first.
_CANDIDATE_OFFSETS = tuple(i / 400 for i in range(12, -5, -1))


def _search_then_test(
    table: ExitTable, target: Target, method: str, max_rounds: int, prices: int, seed: int = 0
) -> tuple[float, ...]:
    """Learn then Test (Angelopoulos et al. 2021): one half of the data proposes, the other tests in sequence.

    A search that must clear a confidence bound on the data it searches picks the thresholds
    whose accuracy that sample happens to overstate, so its profiles miss the target on new data
    far more often than ``1 - confidence``. Here one half proposes threshold sets, strictest
    first, and the other half tests them in that order, each at level ``1 - confidence``
    (one-sided paired bound against the plain model); the cheapest set before the first
    failure wins. The order is fixed before the testing half is seen, so no correction for
    the many candidates is needed.
    """
    order = torch.randperm(table.scores.shape[1], generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    search, test = table.rows(order[:half]), table.rows(order[half:])
    point = Target(min_accuracy=target.min_accuracy, max_drop=target.max_drop)  # the floor, no bound
    floor = _goal(search, point)
    n = search.scores.shape[1]
    candidates = {(math.inf,) * table.num_gates}
    previous = None
    for offset in _CANDIDATE_OFFSETS:
        goal = _Goal("correct", floor.bound + math.ceil(offset * n), floor.changed, 0.0, floor.reference)
        if previous is None or method == "sequential":
            thresholds = _search(search, goal, method, max_rounds, prices)
        else:  # a looser floor descends from the stricter answer, which meets it too: a tenth of a full search
            thresholds = _descend(search, list(previous), goal, max_rounds)
        if goal.shortfall(*_totals(search, thresholds, goal)).item() <= 1e-9:
            candidates.add(tuple(thresholds))
            previous = thresholds
    sequence = sorted(candidates, key=lambda t: tuple(-v for v in search.evaluate(t)[1::-1]))  # costliest first
    tested = _goal(test, target)
    chosen = None
    for thresholds in sequence:
        if tested.shortfall(*_totals(test, thresholds, tested)).item() > 1e-9:
            break
        chosen = thresholds
    if chosen is None:  # even every gate closed fails the bound: say by how much
        _check_met(test, sequence[0], tested, target)
    return chosen


def _search(table: ExitTable, goal: _Goal, method: str, max_rounds: int, prices: int) -> tuple[float, ...]:
    sequential: list[float] = [math.inf] * table.num_gates
    for k in range(table.num_gates):  # the paper's pass: gate by gate, later gates closed
        sequential[k], _ = _best_for_gate(table, sequential, k, goal)
    if method == "sequential":
        return tuple(sequential)
    starts = [sequential, *_price_optima(table, prices, max_rounds)]
    finals = [_descend(table, start, goal, max_rounds) for start in starts]
    return tuple(min(finals, key=lambda t: _rank_of(table, t, goal)))


def chance_bound(num_classes: int) -> float:
    """The accuracy a working plain model clears: twice chance, and at most halfway from chance to perfect.

    Random weights, another class order or badly wrong preprocessing land near chance; the cap
    keeps the bound reachable with two classes (75%, where twice chance would be 100%).
    """
    chance = 1 / num_classes
    return min(2 * chance, (1 + chance) / 2)


def check_plain_accuracy(accuracy: float, num_classes: int, split: str, num_images: int) -> None:
    """Raise :class:`~timm_dgate.ChanceAccuracyError` when the plain model scores below :func:`chance_bound`.

    Thresholds are chosen relative to the plain model and gates are judged against it: a broken
    one makes every profile meaningless (all samples out at the first gate "within 0 pt of it").
    """
    bound = chance_bound(num_classes)
    if accuracy >= bound:
        return
    raise ChanceAccuracyError(
        f"the plain model scores {accuracy:.1%} on {num_images} {split} images, about chance for {num_classes} "
        f"classes ({1 / num_classes:.1%}; a working model clears {bound:.0%}), so gates calibrated or measured "
        "against it mean nothing. Usual causes: a checkpoint that did not load (random weights), preprocessing "
        "that does not match training (input size, mean/std, resize/crop: the model's pretrained_cfg), or labels "
        "in another class order than the model's head. To go on anyway pass allow_chance_accuracy=True "
        "(--allow-chance-accuracy on the command line)."
    )


def validation_cache(model: GatedModel, data: object, progress: bool = True) -> FeatureCache:
    """A validation cache from a loader, or ``data`` itself if it is one.

    Refused: a cache labelled ``test``, and data whose images the gates were fit on or that
    ``evaluate`` measured the model on, recognised by their pixels (``timm_dgate.provenance``).
    """
    if isinstance(data, FeatureCache):
        cache = data
    else:
        cache = cache_features(model, data, split="validation", progress=progress)
    if cache.split == "test":
        raise ValueError(
            "calibration must not see the test split: thresholds are chosen on validation data, "
            "and accuracy is reported on a test split that chose nothing"
        )
    check_labels(cache.labels, model.num_classes)
    model.seen_images.check_calibration(cache.fingerprints)
    return cache


def calibrate(
    model: GatedModel,
    data: object,
    *,
    max_drop: float | None = None,
    min_accuracy: float | None = None,
    max_gflops: float | None = None,
    confidence: float | None = None,
    name: str | None = None,
    method: str = "coordinate",
    exit_score: str | None = None,
    activate: bool = True,
    split: str | None = None,
    allow_chance_accuracy: bool = False,
) -> Profile:
    """Choose thresholds on validation ``data`` (a loader or a validation :class:`FeatureCache`).

    ``model`` is a :class:`~timm_dgate.GatedModel` or a :class:`~timm_dgate.Cascade`: its
    ``validation_table`` turns ``data`` into the :class:`ExitTable` searched here, so one search
    covers every exit of every member of a cascade.

    Give one target: ``max_drop`` (fraction below the plain model's validation accuracy,
    ``0.005`` = half a point), ``min_accuracy`` (fraction in [0, 1)) or ``max_gflops`` (average
    per image, gates included). The result is stored on the model as a named :class:`Profile`.
    A target the validation data cannot meet raises :class:`~timm_dgate.CalibrationError`
    naming the best reachable value, and nothing is stored or activated.

    ``confidence`` (e.g. ``0.9``) makes an accuracy target hold on new data with that
    probability rather than on the validation estimate: half of ``data`` proposes thresholds,
    the other half tests them (:func:`search_thresholds`). Without it, more than half of all
    profiles land below their target on new data; with it, expect fewer FLOPs saved.

    ``split`` is what the profile records as its calibration data (default: the cache's split
    name); say which images they were, so that later calibrations can be checked against it.
    """
    target = Target(min_accuracy=min_accuracy, max_drop=max_drop, max_gflops=max_gflops, confidence=confidence)
    score = exit_score or model.exit_score
    table, data_split = model.validation_table(data, score)
    if not allow_chance_accuracy:
        check_plain_accuracy(table.plain_accuracy, model.num_classes, data_split, table.correct.shape[1])
    thresholds = search_thresholds(table, target, method)
    accuracy, gflops, fractions = table.evaluate(thresholds)
    profile = Profile(
        name=name or f"{target.describe()} ({score})",
        thresholds=thresholds,
        exit_score=score,
        target=target.describe(),
        split=split or data_split,
        val_accuracy=accuracy,
        val_gflops=gflops,
        val_plain_accuracy=table.plain_accuracy,
        exit_fractions=tuple(fractions.tolist()),
    )
    model.add_profile(profile, activate=activate)
    return profile


def calibrate_targets(
    model: GatedModel,
    cache: FeatureCache,
    split: str,
    max_drop_points: Sequence[float] = (),
    max_gflops: Sequence[float] = (),
    confidence: float | None = None,
    allow_chance_accuracy: bool = False,
) -> list[Profile]:
    """One profile per target, named ``drop-<pt>pt`` (drops in points) / ``gflops-<G>``; the first is active.

    ``split`` is what each profile records as the images that chose it.
    """
    options = {"split": split, "allow_chance_accuracy": allow_chance_accuracy}
    profiles = [
        calibrate(model, cache, max_drop=d / 100, confidence=confidence, name=f"drop-{d:g}pt", **options)
        for d in max_drop_points
    ]
    profiles += [calibrate(model, cache, max_gflops=g, name=f"gflops-{g:g}", **options) for g in max_gflops]
    model.use_profile(profiles[0].name)
    return profiles


@_one_thread()
def tradeoff_curve(table: ExitTable, points: int = 24, max_rounds: int = 10) -> list[tuple[float, ...]]:
    """Thresholds on the Pareto front of (accuracy, GFLOPs) on ``table``, cheapest first.

    Found by a sweep of FLOPs-per-correct-answer prices; evaluate them on another split's
    table to draw an honest curve.
    """
    found = {tuple([math.inf] * table.num_gates)} | {tuple(t) for t in _price_optima(table, points, max_rounds)}
    scored = sorted(found, key=lambda t: (table.evaluate(t)[1], -table.evaluate(t)[0]))
    front: list[tuple[float, ...]] = []
    best = -1.0
    for thresholds in scored:
        accuracy = table.evaluate(thresholds)[0]
        if accuracy > best:
            front.append(thresholds)
            best = accuracy
    return front


def measured_tradeoff(val_table: ExitTable, test_table: ExitTable) -> list[tuple[float, float]]:
    """(accuracy, GFLOPs) on ``test_table`` along the front chosen on ``val_table``, cheapest first.

    The honest curve: thresholds come from validation only, the plain model (every gate closed)
    is always its costliest point, and the test split only scores.
    """
    closed = (math.inf,) * val_table.num_gates
    return sorted((test_table.evaluate(t)[:2] for t in {*tradeoff_curve(val_table), closed}), key=lambda p: p[1])
