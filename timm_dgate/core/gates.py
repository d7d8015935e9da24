"""The decision gate: global pooling of a stage's features, then a head that gives one margin per class.

Each output of the paper's linear head is the signed distance ``d_c = w_c^T x - b_c`` of the
sample to class c's one-vs-all decision boundary (Shafiee et al. 2019, section 3); a
hinge-trained gate reads them as margins. Heads are named in a registry
(:func:`register_gate_head`, like PEFT's ``register_peft_method``), so a config stores a head as
data, its name and options, and a saved model names what rebuilds it: ``linear`` (the paper's)
and ``mlp`` (one hidden layer) are built in. The cost model counts any head's FLOPs with its gate's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import get_spatial_dim
from torch import nn

from .boundary import LAYOUTS

POOLS = ("avg", "token")
HeadBuilder = Callable[..., nn.Sequential]  # build(num_features, num_classes, **options)


@dataclass(frozen=True)
class GateHead:
    """A registered head: how to build its layers, and the Adam rate ``fit`` trains it at by default."""

    name: str
    build: HeadBuilder
    default_lr: float

    def check(self, options: Mapping[str, Any]) -> None:
        """Refuse options ``build`` does not take, before any gate is built (their values it checks itself)."""
        try:
            inspect.signature(self.build).bind(0, 0, **options)
        except TypeError as error:
            raise ValueError(f"gate head {self.name!r} does not take the options {dict(options)}: {error}") from error

    def layers(self, num_features: int, num_classes: int, options: Mapping[str, Any]) -> nn.Sequential:
        """The head's layers, checked to start with the biased ``nn.Linear`` that ``fit`` folds its feature
        standardisation into (so a trained gate needs no normalisation layer of its own)."""
        self.check(options)
        layers = self.build(num_features, num_classes, **options)
        first = layers[0] if isinstance(layers, nn.Sequential) and len(layers) else None
        if not isinstance(first, nn.Linear) or first.bias is None or first.in_features != num_features:
            raise TypeError(
                f"gate head {self.name!r} must build an nn.Sequential whose first layer is an "
                f"nn.Linear({num_features}, ...) with a bias"
            )
        return layers


_GATE_HEADS: dict[str, GateHead] = {}


def register_gate_head(name: str, build: HeadBuilder, *, default_lr: float, overwrite: bool = False) -> None:
    """Make ``name`` a head that ``wrap(..., gate_head=name, gate_head_options={...})`` and saved configs use.

    ``build(num_features, num_classes, **options)`` returns an ``nn.Sequential`` that starts with
    an ``nn.Linear`` (with a bias) over the pooled features and ends in ``num_classes`` margins;
    ``options`` must be JSON values, as ``dgate_config.json`` stores them. ``default_lr`` is the
    Adam rate ``fit`` uses when given none. A folder saved with a custom head loads in a process
    that has registered it first, as timm's ``@register_model`` names must be imported.
    """
    if name in _GATE_HEADS and not overwrite:
        raise ValueError(f"gate head {name!r} is already registered; pass overwrite=True to replace it")
    if not default_lr > 0:
        raise ValueError(f"default_lr must be positive, got {default_lr!r}")
    _GATE_HEADS[name] = GateHead(name, build, float(default_lr))


def gate_head(name: str) -> GateHead:
    """The head registered as ``name``; a clear error listing the others."""
    if name not in _GATE_HEADS:
        known = ", ".join(_GATE_HEADS)
        raise ValueError(f"unknown gate head {name!r}; expected one of {known} (or add it with register_gate_head)")
    return _GATE_HEADS[name]


def head_for_hidden(hidden: int) -> tuple[str, dict[str, int]]:
    """The head that a bare ``gate_hidden`` width names (``wrap``'s argument, format-1/2 configs): 0 the linear
    gate, N an ``mlp`` with N hidden units."""
    if not isinstance(hidden, int) or hidden < 0:
        raise ValueError(f"gate_hidden must be 0 (linear gates) or a positive width, got {hidden!r}")
    return ("mlp", {"hidden": hidden}) if hidden else ("linear", {})


def describe_head(name: str, options: Mapping[str, Any]) -> str:
    """``linear``, ``mlp (hidden=128)``: a head as the model card and messages name it."""
    return f"{name} ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else name


def linear_head(num_features: int, num_classes: int) -> nn.Sequential:
    """The paper's gate: one linear layer, whose outputs are the per-class margins."""
    return nn.Sequential(nn.Linear(num_features, num_classes))


def mlp_head(num_features: int, num_classes: int, hidden: int) -> nn.Sequential:
    """``Linear -> GELU -> Linear`` with ``hidden`` units: more capacity on the same pooled features."""
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"an mlp gate head needs a positive hidden width, got {hidden!r}")
    return nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes))


# Adam on standardised features: a convex linear gate takes larger steps than an MLP, which diverges at 0.03
register_gate_head("linear", linear_head, default_lr=0.03)
register_gate_head("mlp", mlp_head, default_lr=0.01)


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
    """Pooled classifier whose outputs are per-class margins, through a registered head (``linear`` by default).

    ``hidden`` holds the head's layers before the last (empty for the paper's linear gate) and
    ``fc`` the last one, so a linear gate keeps the ``fc.weight``/``fc.bias`` names of every saved gate.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        layout: str,
        pool: str = "avg",
        num_prefix_tokens: int = 0,
        head: str = "linear",
        head_options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.pool = FeaturePool(layout, pool, num_prefix_tokens)
        *layers, last = gate_head(head).layers(num_features, num_classes, head_options or {})
        self.hidden = nn.Sequential(*layers)
        self.fc = last

    @property
    def first(self) -> nn.Linear:
        """The layer on the pooled features: its weight sets the input dtype, and ``fit`` folds into it."""
        return self.hidden[0] if len(self.hidden) else self.fc

    @property
    def num_features(self) -> int:
        return self.first.in_features

    def layers(self) -> nn.Sequential:
        """Every layer after pooling, in order, sharing this gate's parameters (what the head built)."""
        return nn.Sequential(*self.hidden, self.fc)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Margins from already pooled features ``(B, C)``."""
        return self.fc(self.hidden(pooled.to(self.first.weight.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x))
