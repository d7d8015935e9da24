"""Accuracy against cost: the Pareto front of threshold sets on a validation table, and that front measured on test.

The front is chosen on validation only and scored on another split, so a plotted curve is one a
user could have obtained, not one fitted to the data it is drawn on.
"""

from __future__ import annotations

import math

from ..core.exit_table import ExitTable
from .search import one_thread, price_optima


@one_thread()
def tradeoff_curve(table: ExitTable, points: int = 24, max_rounds: int = 10) -> list[tuple[float, ...]]:
    """Thresholds on the Pareto front of (accuracy, GFLOPs) on ``table``, cheapest first.

    Found by a sweep of FLOPs-per-correct-answer prices; evaluate them on another split's
    table to draw an honest curve.
    """
    found = {tuple([math.inf] * table.num_gates)} | {tuple(t) for t in price_optima(table, points, max_rounds)}
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
