"""Choosing boundaries: the probed stage or block ends that ``wrap`` gates, and ``stages``' listing of them all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from ..core.boundary import Boundary, model_name
from ..core.costs import costs_to
from ..errors import UnsupportedModelError
from .discovery import block_boundaries, candidate_boundaries, select_boundaries
from .probe import default_input_size, probe_boundaries


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
