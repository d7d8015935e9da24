"""``GatedModel``: a timm classifier with decision gates that really exit early, and ``wrap`` to make one.

A GatedModel is a backbone plus a :class:`~timm_dgate.DGateConfig` (where the gates sit, how
they pool, what they were trained with) plus run-time state: the thresholds in force and the
named threshold profiles. ``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` move all
of it through the folder format of docs/hub.md (``models.gated_io``; the files in ``timm_dgate.hub``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..boundaries.heads import require_classifier, untrained_head_reason
from ..boundaries.probe import default_input_size, engine_for
from ..boundaries.selection import chosen_boundaries
from ..calibration.calibrate import calibrate, validation_cache
from ..core.boundary import model_name
from ..core.config import DGateConfig, config_property
from ..core.costs import GateCosts, measure_costs
from ..core.engine import ExitResult
from ..core.exit_table import ExitTable
from ..core.gates import DecisionGate, head_for_hidden
from ..core.losses import DEFAULT_EXIT_SCORE, check_gate_loss
from ..core.policy import ExitPolicy, ExitPolicyOwner, state_from_tensor, state_tensor
from ..core.profiles import Profile
from ..core.provenance import SeenImages
from ..deploy.graphs import SegmentGraphs, graph_segments
from ..deploy.segments import compile_segments
from ..errors import UnsupportedModelError, UntrainedHeadWarning
from .gated_io import GatedHubMixin
from .pushing import PushToHubMixin
from .tracing import TRACING_MESSAGE, refuse_tracing


class GatedModel(GatedHubMixin, PushToHubMixin, ExitPolicyOwner, nn.Module):
    """Holds a timm model unchanged and attaches a decision gate after some of its stages.

    ``forward`` is a drop-in for the timm model: logits ``(B, num_classes)`` in input order,
    each row from the gate where that sample exited or from the model's own head. Samples
    that exit are removed from the batch at the stage boundary; when none is left the later
    stages do not run. Every gate starts closed (threshold ``inf``), so a freshly wrapped
    model gives exactly the plain model's logits. In train mode no sample exits.
    """

    default_commit_message = "Upload gated model with timm_dgate"

    def __init__(self, model: nn.Module, config: DGateConfig):
        super().__init__()
        if isinstance(model, GatedModel):
            raise UnsupportedModelError(model_name(model.base_model), "it is already gated (a GatedModel)")
        num_classes = require_classifier(model)
        if num_classes != config.num_classes:
            raise ValueError(f"the config is for {config.num_classes} classes; the model has {num_classes}")
        self.base_model = model
        self.config = config
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.gates = nn.ModuleList(
            DecisionGate(
                b.num_chs, config.num_classes, b.layout, config.pool if b.layout == "NLC" else "avg", prefix,
                config.gate_head, config.gate_head_options,
            )
            for b in config.boundaries
        )
        self._policy = ExitPolicy.closed(config.num_gates, config.exit_score)
        self.profiles: dict[str, Profile] = {}
        self.backbone_frozen = False
        self._costs: GateCosts | None = None
        self._segments: list[str] = []  # compiled by compile()
        self._graphs: SegmentGraphs | None = None  # captured by cuda_graphs()
        self.seen_images = SeenImages()  # what fit and evaluate read, so calibrate can refuse it (in memory only)
        self._engine = engine_for(model, config.boundaries)
        self.train(model.training)  # the wrapper starts in the backbone's mode (eval: exits run)

    # ---- settings (read from the config) ----------------------------------------------------

    boundaries = config_property("boundaries", "Where the gates sit, in network order.")
    num_gates = config_property("num_gates", "How many gates (the head is exit ``num_gates``).")
    input_size = config_property("input_size", "The ``(C, H, W)`` the model runs at.")
    num_classes = config_property("num_classes", "The classes of the head and of every gate.")
    pool = config_property("pool", "How a token layout's gates pool (``avg`` or ``token``).")
    gate_loss = config_property("gate_loss", "What the gates were trained with (``hinge`` or ``ce``).")
    gate_distill = config_property("gate_distill", "Weight of the backbone's predictions in the gates' targets.")

    def set_gate_loss(self, loss: str, distill: float = 0.0) -> None:
        """Record what the gates were trained with; the exit score becomes that loss's natural one."""
        self.config = self.config.replace(
            gate_loss=check_gate_loss(loss), gate_distill=float(distill), exit_score=DEFAULT_EXIT_SCORE[loss]
        )
        self._policy = replace(self._policy, exit_score=DEFAULT_EXIT_SCORE[loss])

    # ---- timm's model API, answered by the backbone -------------------------------------------

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The backbone's, so ``timm.data.resolve_model_data_config(gated)`` preprocesses as for the backbone."""
        return self.base_model.pretrained_cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.base_model.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.base_model.get_classifier()

    def reset_classifier(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "timm_dgate: the gates were trained for this head's classes; reset the classifier of the plain "
            "model (gated.unwrap()) and wrap and fit again"
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features for every sample (no exits)."""
        return self.base_model.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.base_model.forward_head(x, pre_logits=pre_logits)

    # ---- thresholds and profiles -------------------------------------------------------

    def prune(self) -> list[str]:
        """Drop the gates closed in the thresholds in force and in every stored profile; returns their names.

        They cost nothing at run time already; dropped, they are gone from the model, its FLOPs
        count and what :meth:`save_pretrained` writes. Profiles made before that still load if
        they keep the dropped gates closed; one that opens a dropped gate is refused.
        """
        self._check_attached()
        if self._segments:
            raise RuntimeError("timm_dgate: prune before compile(); the compiled segments are cut at the gates")
        opened = set(self.policy.opened())
        for profile in self.profiles.values():
            opened.update(profile.opened())
        if not opened:
            raise ValueError(
                "timm_dgate: every gate is closed in the thresholds in force and in every profile, so pruning "
                "would leave none; calibrate first, or use the plain model (gated.unwrap())"
            )
        keep = sorted(opened)
        dropped = [b for k, b in enumerate(self.boundaries) if k not in opened]
        if not dropped:
            return []
        self._engine.remove()
        pruned = self.config.pruned + tuple(b.module for b in dropped)
        self.config = self.config.replace(boundaries=tuple(self.boundaries[k] for k in keep), pruned=pruned)
        self.gates = nn.ModuleList(self.gates[k] for k in keep)
        self._policy = replace(self._policy, thresholds=tuple(self.thresholds[k] for k in keep))
        self.profiles = {name: p.keep_gates(keep) for name, p in self.profiles.items()}
        if self._costs is not None:
            self._costs = self._costs.keep_gates(keep)
        self._engine = engine_for(self.base_model, self.boundaries)
        return [b.name for b in dropped]

    def _accept_profile(self, profile: Profile) -> Profile:
        """A profile with one threshold per gate before :meth:`prune`, moved onto the gates left."""
        if not self.config.pruned or len(profile.thresholds) != self.num_gates + len(self.config.pruned):
            return profile
        order = {name: i for i, (name, _) in enumerate(self.base_model.named_modules())}
        before = sorted([*(b.module for b in self.boundaries), *self.config.pruned], key=order.__getitem__)
        opens = [before[k] for k in profile.opened() if before[k] in self.config.pruned]
        if opens:
            raise ValueError(
                f"profile {profile.name!r} opens the gate(s) at {', '.join(opens)}, which prune() removed from this "
                "model; calibrate again on the pruned model"
            )
        kept = {b.module for b in self.boundaries}
        return profile.keep_gates([k for k, module in enumerate(before) if module in kept])

    def calibrate(self, data: Any, **target: Any) -> Profile:
        """Choose thresholds on validation ``data`` and store them as a profile; see :func:`timm_dgate.calibrate`."""
        return calibrate(self, data, **target)

    def validation_table(self, data: Any, exit_score: str | None = None) -> tuple[ExitTable, str]:
        """What :func:`timm_dgate.calibrate` searches: every exit's score and correctness on validation ``data``
        (a loader or a validation cache), and the split's name."""
        cache = validation_cache(self, data)
        return ExitTable.from_cache(self, cache, exit_score), cache.split

    # ---- running ----------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, return_exits: bool = False, profile: str | ExitPolicy | None = None
    ) -> torch.Tensor | ExitResult:
        """Logits with early exits; with ``return_exits`` also each sample's exit (``num_gates`` = head).

        ``profile``: a stored profile's name or an :class:`~timm_dgate.core.policy.ExitPolicy` for this
        call alone (a server picks one per request); default: the policy in force, read once here.
        (Not keyword-only: ``torch.onnx.export`` passes every argument by position.)
        In train mode no sample exits: the output is the backbone's (gate outputs stay available
        through :meth:`forward_gates`).
        """
        self._check_attached()
        policy = self.policy_for(profile)
        if self.training or policy.all_closed:
            if not return_exits:
                return self.base_model(x)
            logits = self.base_model(x)
            return ExitResult(logits, torch.full((len(logits),), self.num_gates, dtype=torch.long, device=x.device))
        refuse_tracing()
        decide = policy.decide(self.gates)
        result = self._engine.exit_forward(x, decide)
        return result if return_exits else result.logits

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain timm model's logits for every sample (no exits): what profiles are measured against."""
        return self.base_model(x)

    def forward_pooled(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One full backbone pass: every gate's pooled input features and the final logits."""
        self._check_attached()
        outputs, logits = self._engine.collect(x, lambda k, out: self.gates[k].pool(out))
        return [o[0] for o in outputs], logits

    def forward_gates(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One full backbone pass: every gate's margins for every sample, and the final logits."""
        pooled, logits = self.forward_pooled(x)
        return [gate.head(p) for gate, p in zip(self.gates, pooled)], logits

    def compile(self, **compile_kwargs: Any) -> list[str]:  # type: ignore[override]
        """Compile the backbone's work between exits in place, leaving the exit decisions eager.

        ``compile_kwargs`` go to ``torch.compile`` (``dynamic=True`` unless given). Unlike
        ``torch.compile(gated)``, the number of graphs does not grow with batch sizes or exit
        patterns; see ``timm_dgate.deploy.segments``. Returns the compiled segments' module names.
        """
        self._check_attached()
        if self._segments:
            raise RuntimeError(f"timm_dgate: this gated model is already compiled ({len(self._segments)} segments)")
        self._segments = compile_segments(self.base_model, [b.module for b in self.boundaries], **compile_kwargs)
        return list(self._segments)

    def cuda_graphs(self, buckets: Sequence[int] | None = None) -> SegmentGraphs:
        """Replay the backbone's work between exits from CUDA graphs, captured lazily per batch-size bucket.

        ``buckets``: the batch sizes to capture (a batch pads up to the next one; default: powers of two).
        The exit decisions stay eager, as with :meth:`compile` (which may come first: the compiled
        segments are captured). A CUDA model only; see ``timm_dgate.deploy.graphs``. Returns the graphed
        segments, whose ``memory_bytes`` says what the captured graphs hold.
        """
        self._check_attached()
        if self._graphs is not None:
            raise RuntimeError("timm_dgate: this gated model already replays CUDA graphs")
        self._graphs = graph_segments(self.base_model, [b.module for b in self.boundaries], buckets)
        return self._graphs

    @property
    def compiled_segments(self) -> list[str]:
        """The module names ``compile()`` compiled (empty before it)."""
        return list(self._segments)

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(TRACING_MESSAGE.format(how="torch.jit.script"))

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

    # ---- state_dict carries the behaviour -------------------------------------------------

    def get_extra_state(self) -> torch.Tensor:
        """Thresholds, exit score, profiles and the active profile travel in ``state_dict()`` (as JSON bytes)."""
        gates = [b.module for b in self.boundaries]
        return state_tensor(
            {"gates": gates, "gate_loss": self.gate_loss, "gate_distill": self.gate_distill, **self._policy_state()}
        )

    def set_extra_state(self, state: torch.Tensor) -> None:
        values = state_from_tensor(state)
        mine = [b.module for b in self.boundaries]
        if list(values.get("gates", [])) != mine:
            raise ValueError(
                f"this state dict is for gates at {list(values.get('gates', []))}; this model's gates are at {mine}"
            )
        self._load_policy_state(values)
        loss, distill = values.get("gate_loss", self.gate_loss), values.get("gate_distill", self.gate_distill)
        self.config = self.config.replace(gate_loss=loss, gate_distill=distill)

    # ---- cost ---------------------------------------------------------------------------

    @property
    def costs(self) -> GateCosts:
        """FLOPs per image up to each gate, of each gate, and of the whole backbone (measured once)."""
        if self._costs is None:
            self._check_attached()
            self._costs = measure_costs(
                self.base_model, [b.module for b in self.boundaries], self.gates, self.input_size,
                [b.part for b in self.boundaries],
            )
        return self._costs

    def unwrap(self) -> nn.Module:
        """Remove the hooks and return the plain timm model; this wrapper refuses to run afterwards."""
        self._engine.remove()
        return self.base_model

    def _check_attached(self) -> None:
        if not self._engine.attached:
            raise RuntimeError("timm_dgate: this gated model was unwrapped; wrap the timm model again to use gates")

    def extra_repr(self) -> str:
        gates = ", ".join(f"{b.name}({b.layout})" for b in self.boundaries)
        return f"gates=[{gates}], exit_score={self.exit_score}"


def wrap(
    model: nn.Module,
    gates: Sequence[str | int] | str | None = None,
    *,
    input_size: Sequence[int] | None = None,
    pool: str = "avg",
    exit_score: str = "margin",
    model_args: dict | None = None,
    base_model: str | None = None,
    gate_head: str = "linear",
    gate_head_options: Mapping[str, Any] | None = None,
    gate_hidden: int = 0,
) -> GatedModel:
    """Attach decision gates to a timm classifier.

    Args:
        model: a timm classifier (``timm.create_model(..., num_classes=N)``).
        gates: boundary names or ``feature_info`` indices; ``"blocks"``: every block end that
            passes the probe (stems excluded), and block names from
            ``stages(model, level="block")`` pick any of them; default: after every stage but
            the last (evenly spaced blocks for plain transformers). See :func:`timm_dgate.stages`.
        input_size: ``(C, H, W)`` the model runs at; default: its pretrained config.
        pool: ``avg`` or, for token layouts with a class token, ``token``.
        exit_score: ``margin`` (hinge gates), ``softmax`` or ``entropy`` (cross-entropy gates).
        model_args: ``timm.create_model`` kwargs needed to rebuild the backbone that timm did not
            record itself (it records those passed to ``create_model``); saved by ``save_pretrained``.
        base_model: the timm Hub id the backbone's weights come from; ``save_pretrained`` then
            writes a gates-only folder that names it.
        gate_head, gate_head_options: each gate's head and what builds it: ``linear`` (the
            paper's), ``mlp`` with ``{"hidden": N}``, or one added by :func:`timm_dgate.register_gate_head`;
            its FLOPs are counted with the gate's.
        gate_hidden: shorthand for ``gate_head="mlp", gate_head_options={"hidden": gate_hidden}`` (0: linear).

    Every chosen boundary is verified with a dummy batch; one that cannot work as an exit
    raises :class:`~timm_dgate.UnsupportedModelError` naming the model, boundary and reason.
    A classifier that looks never trained (timm replaced the checkpoint's head, or it is still
    at its initialisation) gives an :class:`~timm_dgate.errors.UntrainedHeadWarning`.
    """
    if isinstance(model, GatedModel):
        raise UnsupportedModelError(model_name(model.base_model), "it is already gated (a GatedModel)")
    num_classes = require_classifier(model)
    reason = untrained_head_reason(model)
    if reason is not None:
        warnings.warn(f"timm_dgate.wrap({model_name(model)}): {reason}", UntrainedHeadWarning, stacklevel=2)
    input_size = tuple(input_size or default_input_size(model))
    if gate_hidden:  # the bare width wrap took before heads were named: an mlp head
        if gate_head != "linear" or gate_head_options:
            raise ValueError(f"give gate_hidden={gate_hidden} (an mlp head) or gate_head={gate_head!r}, not both")
        gate_head, gate_head_options = head_for_hidden(gate_hidden)
    config = DGateConfig(
        architecture=model_name(model),
        num_classes=num_classes,
        input_size=input_size,
        boundaries=tuple(replace(b, gflops=None) for b in chosen_boundaries(model, gates, input_size)),
        pool=pool,
        exit_score=exit_score,
        base_model=base_model,
        include_backbone=base_model is None,
        model_args=dict(model_args or {}),
        gate_head=gate_head,
        gate_head_options=dict(gate_head_options or {}),
    )
    return GatedModel(model, config)
