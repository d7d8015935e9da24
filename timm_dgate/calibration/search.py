"""The threshold search: a target accuracy (or FLOPs budget) at the lowest average FLOPs, on an exit table.

Everything runs on a validation :class:`~timm_dgate.core.exit_table.ExitTable` (every gate's exit
score and prediction, and the head's, for every sample), so a search costs no backbone passes.
Two searches:

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
from functools import partial

import torch

from ..core.exit_table import ExitTable
from .goals import Goal, Target, check_met, goal_of, rank_of
from .learn_then_test import search_then_test

SEARCHES = ("sequential", "coordinate")


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def price_optima(table: ExitTable, count: int, max_rounds: int) -> list[list[float]]:
    """Thresholds minimising ``FLOPs - price * correct`` for ``count`` prices from 1e-3 to 1e2 backbones."""
    optima = []
    for i in range(count):
        price = table.costs.backbone * 10 ** (-3 + 5 * i / max(1, count - 1))
        optima.append(descend(table, [math.inf] * table.num_gates, Goal("price", price, table.correct), max_rounds))
    return optima


def best_for_gate(table: ExitTable, thresholds: list[float], k: int, goal: Goal) -> tuple[float, float]:
    """Best threshold for gate ``k`` with the others fixed, and its rank; closing the gate included."""
    closed = [*thresholds[:k], math.inf, *thresholds[k + 1 :]]
    closed_rank = rank_of(table, closed, goal)
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


def descend(table: ExitTable, thresholds: list[float], goal: Goal, max_rounds: int) -> list[float]:
    """Coordinate descent: re-optimise one gate at a time until no single move improves the rank."""
    thresholds = list(thresholds)
    current = rank_of(table, thresholds, goal)
    for _ in range(max_rounds):
        improved = False
        for k in range(table.num_gates):
            candidate, rank = best_for_gate(table, thresholds, k, goal)
            if rank < current - 1e-9:
                thresholds[k], current, improved = candidate, rank, True
        if not improved:
            break
    return thresholds


def search_goal(table: ExitTable, goal: Goal, method: str, max_rounds: int, prices: int) -> tuple[float, ...]:
    """The best thresholds for ``goal`` on ``table`` by ``method`` (see the module doc), met or not."""
    sequential: list[float] = [math.inf] * table.num_gates
    for k in range(table.num_gates):  # the paper's pass: gate by gate, later gates closed
        sequential[k], _ = best_for_gate(table, sequential, k, goal)
    if method == "sequential":
        return tuple(sequential)
    starts = [sequential, *price_optima(table, prices, max_rounds)]
    finals = [descend(table, start, goal, max_rounds) for start in starts]
    return tuple(min(finals, key=lambda t: rank_of(table, t, goal)))


def _propose(
    table: ExitTable, goal: Goal, previous: Sequence[float] | None, method: str, max_rounds: int, prices: int
) -> Sequence[float]:
    """One candidate of a confident search: a full search, or from the second on (coordinate only) a descent
    from the stricter candidate before it, which meets the looser floor too: a tenth of a full search."""
    if previous is None or method == "sequential":
        return search_goal(table, goal, method, max_rounds, prices)
    return descend(table, list(previous), goal, max_rounds)


@one_thread()
def search_thresholds(
    table: ExitTable, target: Target, method: str = "coordinate", max_rounds: int = 10, prices: int = 8
) -> tuple[float, ...]:
    """Thresholds that meet ``target`` on ``table`` at the lowest average FLOPs (see module doc).

    ``coordinate`` descends from the sequential answer and from the optima of ``prices``
    trade-offs ``FLOPs - price * correct`` (which spread the accuracy budget over all gates
    instead of spending it at the first), and keeps the best; never worse than sequential.
    With ``target.confidence`` the data is split in two halves, one to propose and one to test
    (:func:`~timm_dgate.calibration.learn_then_test.search_then_test`), so that the bound holds
    for the thresholds chosen. Raises :class:`~timm_dgate.CalibrationError` when no thresholds
    meet the target.
    """
    if method not in SEARCHES:
        raise ValueError(f"unknown search {method!r}; expected one of {SEARCHES}")
    if target.confidence is not None:
        propose = partial(_propose, method=method, max_rounds=max_rounds, prices=prices)
        return search_then_test(table, target, propose)
    thresholds = search_goal(table, goal_of(table, target), method, max_rounds, prices)
    check_met(table, thresholds, goal_of(table, target), target)
    return thresholds
