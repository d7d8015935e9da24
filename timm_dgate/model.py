"""``GatedModel``: a timm classifier with decision gates that really exit early."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .discovery import Boundary, UnsupportedModelError, candidate_boundaries, model_name, select_boundaries
from .engine import ExitEngine, ExitResult
from .flops import GateCosts, measure_costs
from .gates import DecisionGate
from .probe import default_input_size, probe_boundaries
from .profiles import Profile
from .scores import check_exit_score, exit_score


class GatedModel(nn.Module):
    """Holds a timm model unchanged and attaches a decision gate after some of its stages.

    ``forward`` is a drop-in for the timm model: logits ``(B, num_classes)`` in input order,
    each row from the gate where that sample exited or from the model's own head. Samples
    that exit are removed from the batch at the stage boundary; when none is left the later
    stages do not run. Every gate starts closed (threshold ``inf``), so a freshly wrapped
    model gives exactly the plain model's logits.
    """

    def __init__(
        self,
        model: nn.Module,
        boundaries: Sequence[Boundary],
        input_size: Sequence[int],
        pool: str = "avg",
        exit_score: str = "margin",
        model_args: dict | None = None,
    ):
        super().__init__()
        num_classes = require_classifier(model)
        self.base_model = model
        self.boundaries = tuple(boundaries)
        self.input_size = tuple(int(s) for s in input_size)
        self.num_classes = int(num_classes)
        self.pool = pool
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.gates = nn.ModuleList(
            DecisionGate(b.num_chs, self.num_classes, b.layout or "NCHW", pool if b.layout == "NLC" else "avg", prefix)
            for b in self.boundaries
        )
        self.exit_score = check_exit_score(exit_score)
        self.thresholds: tuple[float, ...] = (math.inf,) * len(self.boundaries)
        self.profiles: dict[str, Profile] = {}
        self.active_profile: str | None = None
        self.backbone_frozen = False
        self.gate_loss = "hinge"  # what the gates were trained with; set by fit(), saved by save_pretrained()
        self.model_args = dict(model_args) if model_args else None  # create_model kwargs timm did not record
        self._costs: GateCosts | None = None
        self._engine = ExitEngine(model, [b.module for b in self.boundaries])

    @property
    def num_gates(self) -> int:
        return len(self.gates)

    # ---- thresholds and profiles -------------------------------------------------------

    def set_thresholds(self, thresholds: Sequence[float] | torch.Tensor, exit_score: str | None = None) -> None:
        """Set one threshold per gate (``inf`` closes it); takes effect on the next forward."""
        values = tuple(float(t) for t in (thresholds.tolist() if isinstance(thresholds, torch.Tensor) else thresholds))
        if len(values) != self.num_gates:
            raise ValueError(f"expected {self.num_gates} thresholds (one per gate), got {len(values)}")
        if any(math.isnan(t) for t in values):
            raise ValueError(f"thresholds must not be NaN: {values}")
        self.thresholds = values
        if exit_score is not None:
            self.exit_score = check_exit_score(exit_score)
        self.active_profile = None

    def close_gates(self) -> None:
        """Every gate closed: the model behaves exactly like the plain timm model."""
        self.set_thresholds([math.inf] * self.num_gates)

    def add_profile(self, profile: Profile, activate: bool = False) -> None:
        """Store a named threshold profile (replacing one of the same name)."""
        if len(profile.thresholds) != self.num_gates:
            raise ValueError(
                f"profile {profile.name!r} has {len(profile.thresholds)} thresholds; "
                f"this model has {self.num_gates} gates"
            )
        self.profiles[profile.name] = profile
        if activate:
            self.use_profile(profile.name)

    def use_profile(self, name: str) -> Profile:
        """Switch to a stored profile's thresholds and exit score."""
        if name not in self.profiles:
            known = ", ".join(self.profiles) or "none"
            raise KeyError(f"unknown profile {name!r}; this model has: {known}")
        profile = self.profiles[name]
        self.set_thresholds(profile.thresholds, profile.exit_score)
        self.active_profile = name
        return profile

    def calibrate(self, data: Any, **target: Any) -> Profile:
        """Choose thresholds on validation ``data`` and store them as a profile; see :func:`timm_dgate.calibrate`."""
        from .calibrate import calibrate

        return calibrate(self, data, **target)

    # ---- running ----------------------------------------------------------------------

    def _decide(self, k: int, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        threshold = self.thresholds[k]
        if threshold == math.inf:
            return None
        margins = self.gates[k](output)
        return margins, exit_score(margins, self.exit_score) >= threshold

    def forward(self, x: torch.Tensor, return_exits: bool = False) -> torch.Tensor | ExitResult:
        """Logits with early exits; with ``return_exits`` also each sample's exit (``num_gates`` = head)."""
        if all(t == math.inf for t in self.thresholds) and not return_exits:
            return self.base_model(x)
        result = self._engine.exit_forward(x, self._decide)
        return result if return_exits else result.logits

    def forward_pooled(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One full backbone pass: every gate's pooled input features and the final logits."""
        outputs, logits = self._engine.collect(x, lambda k, out: self.gates[k].pool(out))
        return [o[0] for o in outputs], logits

    def forward_gates(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One full backbone pass: every gate's margins for every sample, and the final logits."""
        pooled, logits = self.forward_pooled(x)
        return [gate.fc(p.to(gate.fc.weight.dtype)) for gate, p in zip(self.gates, pooled)], logits

    # ---- training support ---------------------------------------------------------------

    def freeze_backbone(self) -> GatedModel:
        """No gradients into the timm model and BatchNorm kept in eval mode (buffers untouched)."""
        self.base_model.requires_grad_(False)
        self.base_model.eval()
        self.backbone_frozen = True
        return self

    def train(self, mode: bool = True) -> GatedModel:
        super().train(mode)
        if self.backbone_frozen:
            self.base_model.eval()
        return self

    # ---- cost ---------------------------------------------------------------------------

    @property
    def costs(self) -> GateCosts:
        """FLOPs per image up to each gate, of each gate, and of the whole backbone (measured once)."""
        if self._costs is None:
            self._costs = measure_costs(
                self.base_model, [b.module for b in self.boundaries], self.gates, self.input_size
            )
        return self._costs

    def unwrap(self) -> nn.Module:
        """Remove the hooks and return the plain timm model."""
        self._engine.remove()
        return self.base_model

    def extra_repr(self) -> str:
        gates = ", ".join(f"{b.name}({b.layout})" for b in self.boundaries)
        return f"gates=[{gates}], exit_score={self.exit_score}"

    # ---- Hub I/O (timm_dgate.hub; format in docs/hub.md) ---------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        base_model: str | None = None,
        include_backbone: bool | None = None,
        tradeoff_plot: str | os.PathLike | None = None,
    ) -> Path:
        """Write gates, profiles, config and model card (and the backbone in timm's layout) to a folder.

        ``base_model`` (a timm Hub id such as ``"timm/resnet50.a1_in1k"``) makes a gates-only
        folder that names its backbone instead of storing it, unless ``include_backbone=True``.
        """
        from .hub import save_pretrained

        return save_pretrained(
            self, save_directory, base_model=base_model, include_backbone=include_backbone, tradeoff_plot=tradeoff_plot
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload gated model with timm_dgate",
        token: str | None = None,
        create_pr: bool = False,
        base_model: str | None = None,
        include_backbone: bool | None = None,
        tradeoff_plot: str | os.PathLike | None = None,
    ) -> Any:
        """Save as in :meth:`save_pretrained` and commit the folder to a Hub repo (created if needed).

        ``token`` defaults to huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``).
        """
        from .hub import push_to_hub

        return push_to_hub(
            self,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            base_model=base_model,
            include_backbone=include_backbone,
            tradeoff_plot=tradeoff_plot,
        )


def require_classifier(model: nn.Module) -> int:
    """Gates predict classes, so the model must have a head; checked before any probe runs."""
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise UnsupportedModelError(
            model_name(model),
            f"it has no classifier (num_classes={num_classes!r}); create the timm model with num_classes > 0",
        )
    return int(num_classes)


def wrap(
    model: nn.Module,
    gates: Sequence[str | int] | None = None,
    *,
    input_size: Sequence[int] | None = None,
    pool: str = "avg",
    exit_score: str = "margin",
    model_args: dict | None = None,
) -> GatedModel:
    """Attach decision gates to a timm classifier.

    Args:
        model: a timm classifier (``timm.create_model(..., num_classes=N)``).
        gates: boundary names or ``feature_info`` indices; default: after every stage but the
            last (evenly spaced blocks for plain transformers). See :func:`timm_dgate.stages`.
        input_size: ``(C, H, W)`` the model runs at; default: its pretrained config.
        pool: ``avg`` or, for token layouts with a class token, ``token``.
        exit_score: ``margin`` (hinge gates), ``softmax`` or ``entropy`` (cross-entropy gates).
        model_args: ``timm.create_model`` kwargs needed to rebuild the backbone that timm did not
            record itself (it records those passed to ``create_model``); saved by ``save_pretrained``.

    Every chosen boundary is verified with a dummy batch; one that cannot work as an exit
    raises :class:`~timm_dgate.UnsupportedModelError` naming the model, boundary and reason.
    """
    require_classifier(model)
    input_size = tuple(input_size or default_input_size(model))
    chosen = probe_boundaries(model, select_boundaries(model, gates), input_size)
    return GatedModel(model, chosen, input_size, pool=pool, exit_score=exit_score, model_args=model_args)


def stages(model: nn.Module, input_size: Sequence[int] | None = None) -> list[Boundary]:
    """Every boundary of ``model`` where a gate could sit, probed, with the default placement marked.

    Boundaries that fail the probe are listed too, with the reason in ``problem``.
    """
    input_size = tuple(input_size or default_input_size(model))
    return probe_boundaries(model, candidate_boundaries(model), input_size, strict=False)
