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
from ..errors import CalibrationError
from .exact import lower_bound, needed_test_images, passes
from .goals import Goal, Target, goal_of, totals

# Candidates of a confident search: accuracy floors on the search half from 3 points above the
# target to 1 point below it, in quarter points, strictest first.
CANDIDATE_OFFSETS = tuple(i / 400 for i in range(12, -5, -1))

# (search half, floor to meet, the previous candidate or None) -> thresholds meeting it if any do
Propose = Callable[[ExitTable, Goal, Sequence[float] | None], Sequence[float]]


def search_then_test(table: ExitTable, target: Target, propose: Propose, seed: int = 0) -> tuple[float, ...]:
    """One half of ``table`` proposes candidates with ``propose``, strictest first; the other tests them in sequence.

    Each candidate is tested at level ``1 - confidence`` by an exact test (``exact``: a sign test on
    the changes against the plain model, or Clopper-Pearson on the accuracy); the cheapest set
    before the first failure wins. The order is fixed before the testing half is seen, so no
    correction for the many candidates is needed. A table whose testing half is too small for any
    open gate to pass is refused, naming the size needed.
    """
    check_size(table.scores.shape[1], target)
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
    chosen = last_before_first_failure(sequence, lambda thresholds: tested(test, thresholds, target))
    if chosen is None:  # even every gate closed fails the test (min_accuracy): say by how much
        n, correct = test.scores.shape[1], int(test.correct[-1].sum())
        raise CalibrationError(
            f"cannot meet {target.describe()} on this validation data ({table.scores.shape[1]} images): the "
            f"plain model's accuracy on the {n} testing images is {correct / n:.4f}, its exact lower confidence "
            f"bound {lower_bound(correct, n, 1 - target.confidence):.4f}. Nothing was activated."
        )
    return chosen


def tested(test: ExitTable, thresholds: tuple[float, ...], target: Target) -> bool:
    """Whether ``thresholds`` pass ``target``'s exact test on the testing half; every gate closed is the plain
    model itself, which meets any drop target without a test."""
    if target.max_drop is not None and all(t == math.inf for t in thresholds):
        return True
    exits = test.exits(tuple(thresholds))
    correct = test.correct[exits, torch.arange(len(exits))].bool()
    return passes(target, correct, test.correct[-1].bool())


def check_size(images: int, target: Target) -> None:
    """Refuse a validation set whose testing half (the larger one) is too small for any gate to open."""
    needed = max(2, 2 * needed_test_images(target) - 1)  # the testing half holds ceil(images / 2)
    if images < needed:
        raise CalibrationError(
            f"confidence={target.confidence:g} needs at least {needed} validation images for {target.describe()}, "
            f"got {images}: half of them test the thresholds, and on fewer no gate could ever pass that test, "
            "whatever the images show. Give more validation images, or lower confidence. Nothing was activated."
        )


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
