"""The exit-model contract: what the algorithms need of a model, so that none of them imports a model class.

``calibrate``, ``evaluate``, ``bench``, a server and the exported runtime work on anything with
exits and an :class:`~timm_dgate.core.policy.ExitPolicy` (:class:`ExitModel`); ``fit``, the
feature cache, ``compile()`` and ``export`` work on a backbone with gates (:class:`GatedBackbone`).
:class:`~timm_dgate.GatedModel` is both; :class:`~timm_dgate.Cascade` and ``deploy.runtime.ExportedGatedModel``
(an exported folder, float or int8, measured on its own scores) are :class:`ExitModel` s. These are
typing protocols: a model satisfies them by having the members, as PEFT's tuners satisfy ``BaseTuner``'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .boundary import Boundary
from .config import DGateConfig
from .engine import ExitResult
from .policy import ExitPolicy
from .profiles import Profile
from .provenance import SeenImages

if TYPE_CHECKING:
    from .costs import CascadeCosts, GateCosts
    from .exit_table import ExitTable


class RunnableExitModel(Protocol):
    """Runs with exits under a policy: what a server and the exported runtime provide."""

    profiles: dict[str, Profile]

    @property
    def num_gates(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def input_size(self) -> tuple[int, int, int]: ...

    @property
    def policy(self) -> ExitPolicy: ...

    @property
    def thresholds(self) -> tuple[float, ...]: ...

    @property
    def exit_score(self) -> str: ...

    @property
    def active_profile(self) -> str | None: ...

    def set_thresholds(self, thresholds: Sequence[float] | torch.Tensor, exit_score: str | None = None) -> None: ...

    def add_profile(self, profile: Profile, activate: bool = False) -> None: ...

    def use_profile(self, name: str) -> Profile: ...

    def policy_for(self, choice: str | ExitPolicy | None = None) -> ExitPolicy: ...

    def __call__(
        self, x: torch.Tensor, return_exits: bool = False, profile: str | ExitPolicy | None = None
    ) -> torch.Tensor | ExitResult: ...


class ExitModel(RunnableExitModel, Protocol):
    """A model with exits that calibration and evaluation can measure (GatedModel, Cascade, an exported runtime)."""

    seen_images: SeenImages
    training: bool

    @property
    def costs(self) -> GateCosts | CascadeCosts: ...

    def validation_table(self, data: Any, exit_score: str | None = None) -> tuple[ExitTable, str]: ...

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


class GatedBackbone(ExitModel, Protocol):
    """A timm backbone with gates at its boundaries: what fit, the feature cache, compile and export need."""

    base_model: nn.Module
    gates: nn.ModuleList
    config: DGateConfig

    @property
    def boundaries(self) -> tuple[Boundary, ...]: ...

    @property
    def compiled_segments(self) -> list[str]: ...

    def calibrate(self, data: Any, **target: Any) -> Profile: ...

    def forward_pooled(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]: ...

    def forward_gates(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]: ...

    def freeze_backbone(self) -> Any: ...

    def set_gate_loss(self, loss: str, distill: float = 0.0) -> None: ...

    def compile(self, **compile_kwargs: Any) -> list[str]: ...
