"""Exact one-sided tests behind ``confidence=``: the level holds at every validation size, one image included.

Learn then Test (``learn_then_test``) asks one question of each candidate on the testing half:
may we say, at level ``alpha = 1 - confidence``, that it meets the target on the population? A
normal approximation answered it before, and with a dozen images it said yes far too often (a
confidence=0.9 profile missed in 30% of draws). The tests here are exact (their error is at most
``alpha`` for every sample size and every population), and they use the same information:

- ``min_accuracy``: each image is right or wrong, so the count of correct answers is binomial and
  the test is Clopper-Pearson's: pass when the accuracy's exact lower bound clears the target.
- ``max_drop``: the target is on the change against the plain model, ``E[win - loss] >= -drop``
  (a win: the exit is right where the plain model is wrong). Pairing is what makes small drops
  testable (the change varies far less than either accuracy), so bounding the two accuracies
  separately would be much wider. Given ``m`` changed images, the wins are ``Binomial(m, q)``
  and the target holds when ``r * (2q - 1) >= -drop`` (``r``: the changed rate). The test bounds
  ``r`` from above (Clopper-Pearson, at a tenth of ``alpha``) and then runs the exact sign test
  of ``q`` against ``(1 - drop / r_upper) / 2`` (at the rest of ``alpha``): the two errors add to
  at most ``alpha``. With ``drop = 0`` the margin vanishes and the plain sign test takes all of
  ``alpha``. On large tables this passes nearly what the normal bound passed (the split costs a
  little); on small ones it passes only what the data can show.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .goals import Target

BISECTIONS = 60  # a bound to 1e-18: far below any difference a count can make


def binomial_tail(at_least: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) >= at_least)``, exact up to float64 rounding."""
    if at_least <= 0:
        return 1.0
    if at_least > n:
        return 0.0
    k = torch.arange(at_least, n + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1)
        - torch.lgamma(k + 1)
        - torch.lgamma(n - k + 1)
        + torch.special.xlogy(k, torch.tensor(p, dtype=torch.float64))
        + torch.special.xlogy(n - k, torch.tensor(1 - p, dtype=torch.float64))
    )
    return min(1.0, torch.logsumexp(log_pmf, 0).exp().item())


def upper_bound(count: int, n: int, alpha: float) -> float:
    """Clopper-Pearson upper bound on a rate seen ``count`` times in ``n``: the largest rate under which
    ``count`` or fewer has probability ``alpha``; rounded up, so never too small."""
    if count >= n:
        return 1.0
    low, high = count / n, 1.0
    for _ in range(BISECTIONS):
        mid = (low + high) / 2
        low, high = (mid, high) if 1 - binomial_tail(count + 1, n, mid) > alpha else (low, mid)
    return high


def lower_bound(count: int, n: int, alpha: float) -> float:
    """Clopper-Pearson lower bound on a rate seen ``count`` times in ``n`` (rounded down)."""
    return 1 - upper_bound(n - count, n, alpha)


def sign_test_passes(wins: int, losses: int, n: int, drop: float, alpha: float) -> bool:
    """Whether ``wins`` and ``losses`` against the plain model in ``n`` images show ``E[win - loss] >= -drop``
    at level ``alpha`` (module doc)."""
    changed = wins + losses
    share = alpha / 10 if drop > 0 else 0.0  # the part of alpha that bounds the changed rate
    if changed > drop * n and binomial_tail(wins, changed, (1 - drop * n / changed) / 2) > alpha - share:
        return False  # fails even at the lowest the bound could be (the changed rate seen): no bisection
    changed_rate = upper_bound(changed, n, share) if share else 1.0
    if changed_rate <= drop:  # even if every change were a loss, the drop is within the target
        return True
    return binomial_tail(wins, changed, (1 - drop / changed_rate) / 2) <= alpha - share


def accuracy_test_passes(correct: int, n: int, min_accuracy: float, alpha: float) -> bool:
    """Whether ``correct`` of ``n`` show an accuracy of at least ``min_accuracy`` at level ``alpha``."""
    return binomial_tail(correct, n, min_accuracy) <= alpha


def passes(target: Target, correct: torch.Tensor, plain: torch.Tensor) -> bool:
    """The test of ``target`` on one candidate: per-image correctness at its exits and the plain model's."""
    alpha = 1 - target.confidence
    n = correct.numel()
    if target.max_drop is None:
        return accuracy_test_passes(int(correct.sum()), n, target.min_accuracy, alpha)
    wins, losses = int((correct & ~plain).sum()), int((~correct & plain).sum())
    return sign_test_passes(wins, losses, n, target.max_drop, alpha)


@lru_cache(maxsize=64)
def needed_test_images(target: Target) -> int:
    """The fewest testing images on which any candidate with an open gate could pass, whatever they show.

    The best a candidate can show is every image a win (or right, for ``min_accuracy``) and none
    lost; below this size even that fails the test, so no gate can ever open.
    """
    alpha = 1 - target.confidence
    n = 1
    while True:
        if target.max_drop is None:
            if accuracy_test_passes(n, n, target.min_accuracy, alpha):
                return n
        elif any(sign_test_passes(wins, 0, n, target.max_drop, alpha) for wins in range(n + 1)):
            return n
        n += 1
