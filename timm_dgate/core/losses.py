"""Gate losses: the paper's one-vs-all multi-class hinge loss, and cross-entropy as its baseline."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GATE_LOSSES = ("hinge", "ce")
# the exit score each loss is read with by default
DEFAULT_EXIT_SCORE = {"hinge": "margin", "ce": "softmax"}


def multiclass_hinge(margins: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``1/n sum_i sum_c max(0, 1 - y_ic d_ic)`` with ``y_ic = +1`` for the true class, ``-1`` otherwise.

    Each class is its own one-vs-all soft-margin problem (the paper, section 3); the L2 term on the
    weights is added by the trainer, which owns them.
    """
    signs = torch.full_like(margins, -1.0)
    signs.scatter_(1, labels.unsqueeze(1), 1.0)
    per_sample = (1.0 - signs * margins).clamp_min(0.0).sum(1)
    return {"none": per_sample, "sum": per_sample.sum()}.get(reduction, per_sample.mean())


def cross_entropy(margins: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy on the gate outputs (Shallow-Deep Networks / BranchyNet style gates).

    ``labels`` are class indices or, for distillation, rows of class probabilities.
    """
    return F.cross_entropy(margins, labels, reduction=reduction)


def check_gate_loss(kind: str) -> str:
    if kind not in GATE_LOSSES:
        raise ValueError(f"unknown gate loss {kind!r}; expected one of {GATE_LOSSES}")
    return kind


def gate_loss(kind: str) -> Callable[..., torch.Tensor]:
    """The loss function for ``kind`` (``hinge`` or ``ce``)."""
    return {"hinge": multiclass_hinge, "ce": cross_entropy}[check_gate_loss(kind)]
