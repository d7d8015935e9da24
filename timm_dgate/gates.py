"""The decision gate: global pooling of a stage's features, then one linear layer.

Each output of the linear layer is the signed distance ``d_c = w_c^T x - b_c`` of the sample
to class c's one-vs-all decision boundary (Shafiee et al. 2019, section 3); a hinge-trained
gate reads them as margins.
"""

from __future__ import annotations

import torch
from timm.layers import get_spatial_dim
from torch import nn

from .discovery import LAYOUTS

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


class DecisionGate(nn.Module):
    """Pooled linear classifier whose outputs are per-class margins."""

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        layout: str,
        pool: str = "avg",
        num_prefix_tokens: int = 0,
    ):
        super().__init__()
        self.pool = FeaturePool(layout, pool, num_prefix_tokens)
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).to(self.fc.weight.dtype))
