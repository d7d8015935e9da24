"""Exit scores: how confident a gate is, as one number per sample (higher = more confident).

``margin`` is the paper's rule for hinge gates (``max_c d_c``); ``softmax`` (max softmax
probability, as Shallow-Deep Networks) and ``entropy`` (negative entropy of the softmax, as
BranchyNet) are the usual rules for cross-entropy gates. A sample exits when its score
reaches the gate's threshold.
"""

from __future__ import annotations

import torch

EXIT_SCORES = ("margin", "softmax", "entropy")


def check_exit_score(kind: str) -> str:
    if kind not in EXIT_SCORES:
        raise ValueError(f"unknown exit score {kind!r}; expected one of {EXIT_SCORES}")
    return kind


def exit_score(margins: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample confidence ``(B,)`` from a gate's outputs ``(B, C)``."""
    if kind == "margin":
        return margins.amax(1)
    log_p = margins.float().log_softmax(1)
    if kind == "softmax":
        return log_p.amax(1).exp()
    if kind == "entropy":
        return (log_p.exp() * log_p).sum(1)
    raise ValueError(f"unknown exit score {kind!r}; expected one of {EXIT_SCORES}")
