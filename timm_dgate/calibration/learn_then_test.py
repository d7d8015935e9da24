"""Learn then Test (Angelopoulos et al. 2021): how ``confidence=`` makes an accuracy target hold on new data.

A search that must clear a confidence bound on the data it searches picks the thresholds whose
accuracy that sample happens to overstate, so its profiles miss the target on new data far more
often than ``1 - confidence``. Here one half of the data proposes threshold sets and the other
half tests them. How a candidate is proposed is the threshold search's (``search``), passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..core.exit_table import ExitTable
from .goals import Goal, Target, check_met, goal_of, totals

# Candidates of a confident search: accuracy floors on the search half from 3 points above the
# target to 1 point below it, in quarter points, strictest first.
CANDIDATE_OFFSETS = tuple(i / 400 for i in range(12, -5, -1))

# (search half, floor to meet, the previous candidate or None) -> thresholds meeting it if any do
Propose = Callable[[ExitTable, Goal, Sequence[float] | None], Sequence[float]]


def search_then_test(table: ExitTable, target: Target, propose: Propose, seed: int = 0) -> tuple[float, ...]:
    """One half of ``table`` proposes candidates with ``propose``, strictest first; the other tests them in sequence.

    Each candidate is tested at level ``1 - confidence`` (one-sided paired bound against the plain
    model); the cheapest set before the first failure wins. The order is fixed before the testing
    half is seen, so no correction for the many candidates is needed.
    """
    order = torch.randperm(table.scores.shape[1], generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    search, test = table.rows(order[:half]), table.rows(order[half:])
    point = Target(min_accuracy=target.min_accuracy, max_drop=target.max_drop)  # the floor, no bound
    floor = goal_of(search, point)
    n = search.scores.shape[1]
    candidates = {(math.inf,) * table.num_gates}
    previous = None
    for offset in CANDIDATE_OFFSETS:
        goal = Goal("correct", floor.bound + math.ceil(offset * n), floor.changed, 0.0, floor.reference)
        thresholds = propose(search, goal, previous)
        if goal.shortfall(*totals(search, thresholds, goal)).item() <= 1e-9:
            candidates.add(tuple(thresholds))
            previous = thresholds
    sequence = sorted(candidates, key=lambda t: tuple(-v for v in search.evaluate(t)[1::-1]))  # costliest first
    tested = goal_of(test, target)
    chosen = last_before_first_failure(
        sequence, lambda thresholds: tested.shortfall(*totals(test, thresholds, tested)).item() <= 1e-9
    )
    if chosen is None:  # even every gate closed fails the bound: say by how much
        check_met(test, sequence[0], tested, target)
    return chosen


def last_before_first_failure(
    sequence: Sequence[tuple[float, ...]], passes: Callable[[tuple[float, ...]], bool]
) -> tuple[float, ...] | None:
    """Fixed-sequence testing: candidates tested in their fixed order, the last to pass before the first that
    fails. Stopping there is what keeps the error at ``1 - confidence`` with no correction for the number of
    candidates; a cheaper candidate that passes after a failure is a lucky draw, not a guarantee."""
    chosen = None
    for thresholds in sequence:
        if not passes(thresholds):
            break
        chosen = thresholds
    return chosen
