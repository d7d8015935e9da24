"""From a timm model to a gate config: which boundaries ``wrap`` and ``stages`` probe and choose.

Kept apart from the model classes so that building a config (``wrap``, ``from_pretrained``) and
listing boundaries (``stages``) share one path without importing ``GatedModel``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from ..boundaries.discovery import block_boundaries, candidate_boundaries, select_boundaries
from ..boundaries.heads import untrained_head_reason
from ..boundaries.probe import default_input_size, probe_boundaries
from ..core.boundary import Boundary, model_name
from ..core.config import DGateConfig
from ..core.costs import costs_to
from ..core.gates import head_for_hidden
from ..errors import UnsupportedModelError, UntrainedHeadWarning


def require_classifier(model: nn.Module) -> int:
    """Gates predict classes, so the model must have a head; checked before any probe runs."""
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise UnsupportedModelError(
            model_name(model),
            f"it has no classifier (num_classes={num_classes!r}); create the timm model with num_classes > 0",
        )
    return int(num_classes)


def gated_config(
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
) -> DGateConfig:
    """The config of gates at the probed boundaries ``gates`` names: what :func:`timm_dgate.wrap` attaches.

    Arguments as :func:`timm_dgate.wrap`. Every chosen boundary is verified with a dummy batch
    first, and a classifier that looks never trained gives an ``UntrainedHeadWarning``.
    """
    num_classes = require_classifier(model)
    reason = untrained_head_reason(model)
    if reason is not None:
        warnings.warn(f"timm_dgate.wrap({model_name(model)}): {reason}", UntrainedHeadWarning, stacklevel=3)
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
    return config


def chosen_boundaries(model: nn.Module, gates: Sequence[str | int] | str | None,
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
