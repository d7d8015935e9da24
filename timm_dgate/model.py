"""``GatedModel``: a timm classifier with decision gates that really exit early, and ``wrap`` to make one.

A GatedModel is a backbone plus a :class:`~timm_dgate.DGateConfig` (where the gates sit, how
they pool, what they were trained with) plus run-time state: the thresholds in force and the
named threshold profiles. ``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` move all
of it through the folder format of docs/hub.md (file I/O in ``timm_dgate.hub``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub
from .calibration import ExitTable, calibrate, validation_cache
from .config import DGateConfig
from .discovery import Boundary, block_boundaries, candidate_boundaries, model_name, select_boundaries
from .engine import ExitEngine, ExitResult, threshold_decide
from .errors import HubFormatError, UnsupportedModelError, UntrainedHeadWarning
from .flops import GateCosts, costs_to, measure_costs
from .gates import DecisionGate
from .heads import untrained_head_reason
from .losses import DEFAULT_EXIT_SCORE, check_gate_loss
from .probe import default_input_size, probe_boundaries
from .profiles import Profile, decode_thresholds, encode_thresholds
from .provenance import SeenImages
from .scores import check_exit_score, exit_score
from .segments import compile_segments


class GatedModel(nn.Module):
    """Holds a timm model unchanged and attaches a decision gate after some of its stages.

    ``forward`` is a drop-in for the timm model: logits ``(B, num_classes)`` in input order,
    each row from the gate where that sample exited or from the model's own head. Samples
    that exit are removed from the batch at the stage boundary; when none is left the later
    stages do not run. Every gate starts closed (threshold ``inf``), so a freshly wrapped
    model gives exactly the plain model's logits. In train mode no sample exits.
    """

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
                hidden=config.gate_hidden,
            )
            for b in config.boundaries
        )
        self.thresholds: tuple[float, ...] = (math.inf,) * config.num_gates
        self.profiles: dict[str, Profile] = {}
        self.active_profile: str | None = None
        self.backbone_frozen = False
        self._costs: GateCosts | None = None
        self._segments: list[str] = []  # compiled by compile()
        self.seen_images = SeenImages()  # what fit and evaluate read, so calibrate can refuse it (in memory only)
        self._engine = engine_for(model, config.boundaries)
        self.train(model.training)  # the wrapper starts in the backbone's mode (eval: exits run)

    # ---- settings (read from the config) ----------------------------------------------------

    @property
    def boundaries(self) -> tuple[Boundary, ...]:
        return self.config.boundaries

    @property
    def num_gates(self) -> int:
        return self.config.num_gates

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.config.input_size

    @property
    def pool(self) -> str:
        return self.config.pool

    @property
    def exit_score(self) -> str:
        """How gate outputs become one confidence per sample (``margin``, ``softmax``, ``entropy``)."""
        return self.config.exit_score

    @property
    def gate_loss(self) -> str:
        """What the gates were trained with (``hinge`` or ``ce``)."""
        return self.config.gate_loss

    @property
    def gate_distill(self) -> float:
        """Weight of the backbone's own predictions in the gates' training targets (0: labels only)."""
        return self.config.gate_distill

    def set_gate_loss(self, loss: str, distill: float = 0.0) -> None:
        """Record what the gates were trained with; the exit score becomes that loss's natural one."""
        self.config = self.config.replace(
            gate_loss=check_gate_loss(loss), gate_distill=float(distill), exit_score=DEFAULT_EXIT_SCORE[loss]
        )

    # ---- timm's model API, answered by the backbone -------------------------------------------

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

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

    def set_thresholds(self, thresholds: Sequence[float] | torch.Tensor, exit_score: str | None = None) -> None:
        """Set one threshold per gate (``inf`` closes it); takes effect on the next forward."""
        values = thresholds.tolist() if isinstance(thresholds, torch.Tensor) else list(thresholds)
        if len(values) != self.num_gates:
            raise ValueError(f"expected {self.num_gates} thresholds (one per gate), got {len(values)}")
        self.thresholds = decode_thresholds(values)
        if exit_score is not None:
            self.config = self.config.replace(exit_score=check_exit_score(exit_score))
        self.active_profile = None

    def close_gates(self) -> None:
        """Every gate closed: the model behaves exactly like the plain timm model."""
        self.set_thresholds([math.inf] * self.num_gates)

    def add_profile(self, profile: Profile, activate: bool = False) -> None:
        """Store a named threshold profile (replacing one of the same name).

        A profile made before :meth:`prune` is taken on the gates that are left, unless it opens
        a dropped one, which is refused.
        """
        profile = self._after_pruning(profile)
        if len(profile.thresholds) != self.num_gates:
            raise ValueError(
                f"profile {profile.name!r} has {len(profile.thresholds)} thresholds; "
                f"this model has {self.num_gates} gates"
            )
        self.profiles[profile.name] = profile
        if activate:
            self.use_profile(profile.name)

    def prune(self) -> list[str]:
        """Drop the gates closed in the thresholds in force and in every stored profile; returns their names.

        They cost nothing at run time already; dropped, they are gone from the model, its FLOPs
        count and what :meth:`save_pretrained` writes. Profiles made before that still load if
        they keep the dropped gates closed; one that opens a dropped gate is refused.
        """
        self._check_attached()
        if self._segments:
            raise RuntimeError("timm_dgate: prune before compile(); the compiled segments are cut at the gates")
        opened = {k for k, t in enumerate(self.thresholds) if t != math.inf}
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
        self.thresholds = tuple(self.thresholds[k] for k in keep)
        self.profiles = {name: p.keep_gates(keep) for name, p in self.profiles.items()}
        if self._costs is not None:
            self._costs = self._costs.keep_gates(keep)
        self._engine = engine_for(self.base_model, self.boundaries)
        return [b.name for b in dropped]

    def _after_pruning(self, profile: Profile) -> Profile:
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
        return calibrate(self, data, **target)

    def validation_table(self, data: Any, exit_score: str | None = None) -> tuple[ExitTable, str]:
        """What :func:`timm_dgate.calibrate` searches: every exit's score and correctness on validation ``data``
        (a loader or a validation cache), and the split's name."""
        cache = validation_cache(self, data)
        return ExitTable.from_cache(self, cache, exit_score), cache.split

    # ---- running ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor, return_exits: bool = False) -> torch.Tensor | ExitResult:
        """Logits with early exits; with ``return_exits`` also each sample's exit (``num_gates`` = head).

        In train mode no sample exits: the output is the backbone's (gate outputs stay available
        through :meth:`forward_gates`).
        """
        self._check_attached()
        if self.training or all(t == math.inf for t in self.thresholds):
            if not return_exits:
                return self.base_model(x)
            logits = self.base_model(x)
            return ExitResult(logits, torch.full((len(logits),), self.num_gates, dtype=torch.long, device=x.device))
        _refuse_tracing()
        decide = threshold_decide(self.gates, self.thresholds, partial(exit_score, kind=self.exit_score))
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
        patterns; see ``timm_dgate.segments``. Returns the compiled segments' module names.
        """
        self._check_attached()
        if self._segments:
            raise RuntimeError(f"timm_dgate: this gated model is already compiled ({len(self._segments)} segments)")
        self._segments = compile_segments(self.base_model, [b.module for b in self.boundaries], **compile_kwargs)
        return list(self._segments)

    @property
    def compiled_segments(self) -> list[str]:
        """The module names ``compile()`` compiled (empty before it)."""
        return list(self._segments)

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(_TRACING_MESSAGE.format(how="torch.jit.script"))

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
        """Thresholds, exit score, profiles and the active profile travel in ``state_dict()``.

        Stored as JSON bytes in a uint8 tensor, so every consumer of a state dict that expects
        tensors (safetensors, torch.jit, ONNX's exporter) handles it.
        """
        state = {
            "gates": [b.module for b in self.boundaries],
            "thresholds": encode_thresholds(self.thresholds),
            "exit_score": self.exit_score,
            "gate_loss": self.gate_loss,
            "gate_distill": self.gate_distill,
            "profiles": [p.to_dict() for p in self.profiles.values()],
            "active_profile": self.active_profile,
        }
        return torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        state = json.loads(state.cpu().numpy().tobytes().decode())
        mine = [b.module for b in self.boundaries]
        if list(state.get("gates", [])) != mine:
            raise ValueError(
                f"this state dict is for gates at {list(state.get('gates', []))}; this model's gates are at {mine}"
            )
        profiles = [Profile.from_dict(p, self.num_gates) for p in state.get("profiles", [])]
        self.config = self.config.replace(
            gate_loss=state.get("gate_loss", self.gate_loss), gate_distill=state.get("gate_distill", self.gate_distill)
        )
        self.set_thresholds(decode_thresholds(state["thresholds"], self.num_gates), state["exit_score"])
        self.profiles = {p.name: p for p in profiles}
        if state.get("active_profile") is not None:
            self.use_profile(state["active_profile"])

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

    # ---- Hub I/O (format in docs/hub.md) ------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        base_model: str | None = None,
        include_backbone: bool | None = None,
        tradeoff_plot: str | os.PathLike | None = None,
        card_repo_id: str | None = None,
    ) -> Path:
        """Write gates, profiles, config and model card (and the backbone in timm's layout) to a folder.

        ``base_model`` (a timm Hub id such as ``"timm/resnet50.a1_in1k"``) makes a gates-only
        folder that names its backbone instead of storing it, unless ``include_backbone=True``.
        Both default to what the config says (a model loaded from a gates-only folder saves as one).
        ``card_repo_id`` is the repo id the model card's usage snippet loads.
        """
        self._check_attached()
        base_model = base_model or self.config.base_model
        if include_backbone is None:
            include_backbone = self.config.include_backbone if base_model == self.config.base_model else not base_model
        try:
            config = self.config.replace(
                base_model=base_model,
                include_backbone=include_backbone,
                model_args=hub.backbone_args(self.base_model, self.config.model_args),
            )
        except HubFormatError:
            raise
        except ValueError as error:
            raise HubFormatError(str(error)) from error
        tensors = {f"gates.{k}": v.detach().cpu().contiguous() for k, v in self.gates.state_dict().items()}
        return hub.write_folder(
            Path(save_directory),
            config,
            tensors,
            list(self.profiles.values()),
            hub.saved_state(self.thresholds, self.active_profile),
            backbone=self.base_model if config.include_backbone else None,
            backbone_gflops=None if self._costs is None else self._costs.backbone / 1e9,  # saving runs no FLOP count
            tradeoff_plot=tradeoff_plot,
            card_repo_id=card_repo_id,
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
        **save_kwargs: Any,
    ) -> Any:
        """Save as in :meth:`save_pretrained` (``save_kwargs``) and commit the folder to a Hub repo in one commit.

        The repo is created if missing (``private=None``: the Hub's default visibility) and the
        branch ``revision`` too. ``token`` defaults to huggingface_hub's usual sources
        (``HF_TOKEN``, ``hf auth login``). Returns huggingface_hub's ``CommitInfo``.
        """
        return hub.push_folder(
            lambda folder, repo: self.save_pretrained(folder, card_repo_id=repo, **save_kwargs),
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        model: nn.Module | None = None,
        profile: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> GatedModel:
        """Load a gated model saved by ``save_pretrained``/``push_to_hub``, in eval mode.

        Args:
            name_or_path: a local folder, or a Hub repo id (``"org/resnet101-dgate"``).
            revision: branch, tag or commit of a Hub repo.
            model: an existing timm model to attach the gates to instead of building the backbone;
                it must have the saved architecture, number of classes and input channels. It is
                put in eval mode.
            profile: the threshold profile to activate; default: the one active when saved.
            cache_dir, token, local_files_only: as in huggingface_hub (``HF_HUB_OFFLINE=1`` reads
                the cache only).

        Raises :class:`~timm_dgate.HubFormatError` (a missing, corrupted or newer-format file, a
        backbone that does not match) or ``KeyError`` (an unknown profile); a model passed in is
        left unhooked when loading fails.
        """
        options = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        folder = hub.resolve_folder(name_or_path, need_backbone=model is None, **options)
        saved = hub.read_folder(folder)
        if profile is not None and profile not in {p.name for p in saved.profiles}:
            known = ", ".join(p.name for p in saved.profiles) or "none"
            raise KeyError(f"unknown profile {profile!r} in {folder}; it has: {known}")
        if model is None:
            model = hub.load_backbone(saved.config, folder, **options)
        hub.check_backbone(model, saved.config, folder)
        try:
            gated = wrap(model, [b.module for b in saved.config.boundaries], input_size=saved.config.input_size,
                         pool=saved.config.pool, model_args=saved.config.model_args,
                         gate_hidden=saved.config.gate_hidden)
        except ValueError as error:  # UnsupportedModelError or an unknown boundary
            raise HubFormatError(f"the gates in {folder} cannot be attached to this model: {error}") from error
        try:
            hub.check_boundaries(gated.config, saved.config, folder)
            gated.config = saved.config
            device = next(model.parameters()).device
            gated.gates.to(device)
            gated.gates.load_state_dict({k.removeprefix("gates."): v.to(device) for k, v in saved.tensors.items()})
            gated.thresholds = saved.thresholds
            for p in saved.profiles:
                gated.add_profile(p)
            active = profile or saved.active_profile
            if active is not None:
                gated.use_profile(active)
        except Exception:
            gated.unwrap()
            raise
        return gated.eval()


_TRACING_MESSAGE = (
    "timm_dgate: {how} cannot capture a gated forward with open gates: which samples exit depends on the "
    "data, so a traced or exported graph would bake in one exit pattern. With every gate closed "
    "(gated.close_gates()) the gated model is the plain timm model and traces and exports as usual, "
    "or export gated.base_model; see docs/concepts.md, 'Threads, train mode, dtypes and export'."
)


def _refuse_tracing() -> None:
    """Tracing or exporting the data-dependent exits would silently give a graph with one exit pattern."""
    if torch.jit.is_tracing():
        raise RuntimeError(_TRACING_MESSAGE.format(how="torch.jit.trace / torch.onnx.export"))
    if torch.compiler.is_exporting():
        raise RuntimeError(_TRACING_MESSAGE.format(how="torch.export / torch.onnx.export"))


def engine_for(model: nn.Module, boundaries: Sequence[Boundary]) -> ExitEngine:
    """The exit engine for gates at ``boundaries``; every module's input is hooked only where one needs realigning."""
    return ExitEngine(
        model, [b.module for b in boundaries], [b.part for b in boundaries], realign=any(b.realign for b in boundaries)
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
    gates: Sequence[str | int] | str | None = None,
    *,
    input_size: Sequence[int] | None = None,
    pool: str = "avg",
    exit_score: str = "margin",
    model_args: dict | None = None,
    base_model: str | None = None,
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
        gate_hidden: width of a hidden layer in each gate (0: the paper's linear gates); its
            FLOPs are counted with the gate's.

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
    config = DGateConfig(
        architecture=model_name(model),
        num_classes=num_classes,
        input_size=input_size,
        boundaries=tuple(replace(b, gflops=None) for b in _chosen_boundaries(model, gates, input_size)),
        pool=pool,
        exit_score=exit_score,
        base_model=base_model,
        include_backbone=base_model is None,
        model_args=dict(model_args or {}),
        gate_hidden=gate_hidden,
    )
    return GatedModel(model, config)


def _chosen_boundaries(model: nn.Module, gates: Sequence[str | int] | str | None,
                       input_size: tuple[int, ...]) -> list[Boundary]:
    """The probed boundaries ``gates`` names: stage ends as listed by ``feature_info``, else block ends."""
    if isinstance(gates, str) and gates != "blocks":
        raise ValueError(f"gates={gates!r}: give 'blocks', a list of boundary names or indices, or None")
    stage_names = {n for b in candidate_boundaries(model) for n in (b.name, b.module)}
    if gates is None or (gates != "blocks" and all(isinstance(g, int) or g in stage_names for g in gates)):
        return probe_boundaries(model, select_boundaries(model, gates), input_size)
    # blocks: the stages are probed first, so each block knows its stage's layout
    listing = block_boundaries(model, probe_boundaries(model, candidate_boundaries(model), input_size, strict=False))
    if gates != "blocks":
        return probe_boundaries(model, select_boundaries(model, gates, listing), input_size)
    blocks = [b for b in listing if b.reduction >= 4]  # stems excluded, as by default
    chosen = [b for b in probe_boundaries(model, blocks, input_size, strict=False) if not b.problem]
    if not chosen:
        raise UnsupportedModelError(model_name(model), "no block end passes the probe")
    return chosen


LEVELS = ("stage", "block")


def stages(model: nn.Module, input_size: Sequence[int] | None = None, level: str = "stage") -> list[Boundary]:
    """Every boundary of ``model`` where a gate could sit, probed, with the default placement marked
    and the backbone's GFLOPs up to each one that passes (``Boundary.gflops``).

    ``level="block"`` lists every block end of a staged network instead of its stage ends (a
    stage's last block ends it). Boundaries that fail the probe are listed too, with the
    reason in ``problem``.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    input_size = tuple(input_size or default_input_size(model))
    found = probe_boundaries(model, candidate_boundaries(model), input_size, strict=False)
    if level == "block":
        found = probe_boundaries(model, block_boundaries(model, found), input_size, strict=False)
    passing = [b for b in found if not b.problem]
    if not passing:
        return found
    to_gate, _, _ = costs_to(model, [b.module for b in passing], input_size, [b.part for b in passing])
    gflops = dict(zip((b.module for b in passing), to_gate))
    return [b if b.problem else replace(b, gflops=gflops[b.module] / 1e9) for b in found]


from_pretrained = GatedModel.from_pretrained  # the name the mission and timm users reach for
