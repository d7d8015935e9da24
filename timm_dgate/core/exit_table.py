"""The validation outcome of every exit for every sample: what a threshold search and a trade-off curve read.

Built once from a feature cache, it answers "accuracy and FLOPs under these thresholds" with no
backbone pass, so calibration can try thousands of threshold sets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .cache import FeatureCache
from .costs import CascadeCosts, GateCosts
from .scores import check_exit_score, exit_score


class TableSource(Protocol):
    """What :meth:`ExitTable.from_cache` reads of a model; every ``core.contract.GatedBackbone`` has it.

    Typed here rather than against the contract, which names :class:`ExitTable` itself: core has no cycle.
    """

    @property
    def gates(self) -> Iterable[nn.Module]: ...

    @property
    def exit_score(self) -> str: ...

    @property
    def costs(self) -> GateCosts | CascadeCosts: ...


@dataclass
class ExitTable:
    """Validation outcome of exiting at each gate (rows 0..K-1) or the head (row K).

    ``scores``: ``(K, N)`` exit scores; ``correct``: ``(K + 1, N)`` whether that exit's
    prediction is right; ``costs``: the model's FLOPs per exit (a cascade's exits: its members'
    gates and heads, :class:`~timm_dgate.core.costs.CascadeCosts`).
    """

    scores: torch.Tensor
    correct: torch.Tensor
    costs: GateCosts | CascadeCosts

    @classmethod
    def from_cache(cls, model: TableSource, cache: FeatureCache, score: str | None = None) -> ExitTable:
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
