"""Gate kinds: named ways to build and train the gates, from the paper's hinge gates to what measures better.

A kind is data (``GateKind``): a registered gate head (``timm_dgate.core.gates``) with its
options, the loss, how much of the target is the backbone's own prediction (distillation), and
how many survivor-weighted refits follow the first fit. :func:`fit_kind` runs it on feature
caches, so every kind shares the one caching pass, the one threshold search and the Hub format;
the recipe's ``--gate-kind`` names one of :data:`GATE_KINDS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.cache import FeatureCache
from ..core.contract import GatedBackbone
from ..core.gates import describe_head, gate_head
from ..core.losses import check_gate_loss
from .training import DEFAULT_EPOCHS, FitReport, fit, survivor_weights


@dataclass(frozen=True)
class GateKind:
    """How gates are built (a registered ``head`` and its ``head_options``) and trained (``loss``, ``distill``,
    survivor refits).

    ``survivor_rounds`` refits follow the first fit: each calibrates on validation at
    ``survivor_drop`` and refits every gate with :func:`~timm_dgate.fitting.training.survivor_weights`
    (``survivor_floor`` on the samples an earlier gate sends away).
    """

    loss: str = "ce"
    distill: float = 0.0
    head: str = "linear"
    head_options: Mapping[str, Any] = field(default_factory=dict)
    survivor_rounds: int = 0
    survivor_floor: float = 0.1
    survivor_drop: float = 0.005

    def __post_init__(self) -> None:
        check_gate_loss(self.loss)
        if self.distill and self.loss != "ce":
            raise ValueError("distillation needs loss='ce'")
        gate_head(self.head).check(self.head_options)
        if self.survivor_rounds < 0:
            raise ValueError("survivor_rounds must be non-negative")

    @property
    def lr(self) -> float:
        """The Adam rate the kind's head was registered with."""
        return gate_head(self.head).default_lr


GATE_KINDS: dict[str, GateKind] = {
    "hinge": GateKind(loss="hinge"),  # the paper's gates
    "ce": GateKind(),  # Shallow-Deep Networks' cross-entropy gates
    "distill": GateKind(distill=1.0),
    "distill-labels": GateKind(distill=0.5),
    "mlp": GateKind(head="mlp", head_options={"hidden": 128}),
    "survivors": GateKind(survivor_rounds=2),
}
# what measured best on the converged resnet18 (docs/benchmarks.md): MLP gates saved 7.8 / 8.0 points more FLOPs
# than linear CE gates at iso / -0.5 pt, 10.5 / 10.4 more than the paper's hinge gates
DEFAULT_GATE_KIND = "mlp"


def gate_kind(name: str) -> GateKind:
    """The kind called ``name``; a clear error listing the others."""
    if name not in GATE_KINDS:
        raise ValueError(f"unknown gate kind {name!r}; expected one of {', '.join(GATE_KINDS)}")
    return GATE_KINDS[name]


def fit_kind(
    model: GatedBackbone,
    train: FeatureCache,
    kind: GateKind,
    val: FeatureCache | None = None,
    *,
    epochs: int = DEFAULT_EPOCHS,
    **fit_options: object,
) -> FitReport:
    """Fit ``model``'s gates as ``kind`` says, on a training cache (``val`` too for survivor refits).

    The model must have been wrapped with the kind's head (``gate_head=kind.head,
    gate_head_options=kind.head_options``). The thresholds a survivor
    round calibrates only pick the weights: they are dropped before the refit makes them stale,
    and the gates end closed, ready for :func:`~timm_dgate.calibrate`.
    """
    config = model.config
    if (config.gate_head, config.gate_head_options) != (kind.head, kind.head_options):
        raise ValueError(
            f"this kind's gates have {describe_head(kind.head, kind.head_options)} heads, the model's "
            f"{describe_head(config.gate_head, config.gate_head_options)}: "
            f"wrap(..., gate_head={kind.head!r}, gate_head_options={dict(kind.head_options)})"
        )
    if kind.survivor_rounds and val is None:
        raise ValueError("survivor refits choose thresholds on validation data: pass val=<validation cache>")
    options = {"loss": kind.loss, "distill": kind.distill, "epochs": epochs, "lr": kind.lr, **fit_options}
    report = fit(model, train, **options)
    for _ in range(kind.survivor_rounds):
        profile = model.calibrate(val, max_drop=kind.survivor_drop, name="survivor weighting", activate=True)
        weights = survivor_weights(model, train, floor=kind.survivor_floor)
        del model.profiles[profile.name]
        model.set_thresholds([math.inf] * model.num_gates)  # closed, as the GatedBackbone contract spells it
        report = fit(model, train, sample_weights=weights, **options)
    return report
