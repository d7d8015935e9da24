"""The decision gate: global pooling of a stage's features, then one linear layer.

Each output of the linear layer is the signed distance ``d_c = w_c^T x - b_c`` of the sample
to class c's one-vs-all decision boundary (Shafiee et al. 2019, section 3); a hinge-trained
gate reads them as margins. A gate may put one hidden layer before it (``hidden > 0``): a
small MLP, whose extra FLOPs the cost model counts like any other gate's.
"""

from __future__ import annotations

import torch
from timm.layers import get_spatial_dim
from torch import nn

from .boundary import LAYOUTS

POOLS = ("avg", "token")


class FeaturePool(nn.Module):
    """Pool a stage's output of any layout to ``(B, C)``.

    ``avg`` averages the spatial positions (or the non-prefix tokens); ``token`` takes the
    first (class) token of a token layout.
    """

    def __init__(self, layout: str, pool: str = "avg", num_prefix_tokens: int = 0):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown feature layout {layout!r}; expected one of {LAYOUTS}")
        if pool not in POOLS:
            raise ValueError(f"unknown gate pooling {pool!r}; expected one of {POOLS}")
        if pool == "token" and (layout != "NLC" or num_prefix_tokens < 1):
            raise ValueError("pool='token' needs a token layout with a class token")
        self.layout, self.pool, self.num_prefix_tokens = layout, pool, num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NC":
            return x
        if self.layout == "NLC":
            return x[:, 0] if self.pool == "token" else x[:, self.num_prefix_tokens :].mean(1)
        return x.mean(get_spatial_dim(self.layout))

    def extra_repr(self) -> str:
        return f"layout={self.layout}, pool={self.pool}"


def gate_head(num_features: int, num_classes: int, hidden: int = 0) -> nn.Sequential:
    """The layers after pooling: ``Linear`` alone, or ``Linear -> GELU -> Linear`` with ``hidden`` units.

    One definition for the gate itself and for the trainer's working copy, so the two always
    have the same layers and the trained weights load straight into the gate.
    """
    if hidden < 0:
        raise ValueError(f"gate hidden size must be 0 (linear gate) or positive, got {hidden}")
    if hidden == 0:
        return nn.Sequential(nn.Linear(num_features, num_classes))
    return nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes))


class DecisionGate(nn.Module):
    """Pooled classifier whose outputs are per-class margins (a linear layer, or a one-hidden-layer MLP).

    ``hidden`` holds the layers before the last (empty for the paper's linear gate) and ``fc`` the
    last one, so a linear gate keeps the ``fc.weight``/``fc.bias`` names of every saved gate.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        layout: str,
        pool: str = "avg",
        num_prefix_tokens: int = 0,
        hidden: int = 0,
    ):
        super().__init__()
        self.pool = FeaturePool(layout, pool, num_prefix_tokens)
        *layers, last = gate_head(num_features, num_classes, hidden)
        self.hidden = nn.Sequential(*layers)
        self.fc = last

    @property
    def num_features(self) -> int:
        return self.layers()[0].in_features

    def layers(self) -> nn.Sequential:
        """Every layer after pooling, in order, sharing this gate's parameters (the shape of :func:`gate_head`)."""
        return nn.Sequential(*self.hidden, self.fc)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Margins from already pooled features ``(B, C)``."""
        return self.fc(self.hidden(pooled.to(self.fc.weight.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x))
