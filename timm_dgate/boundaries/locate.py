"""Find the module behind a ``feature_info`` entry that names none, by the shape it reports.

Some families list names that only their feature extraction uses (``block.0`` where the
classifier has ``blocks.0.1``, ``stage1`` where it has ``layer1``). Each entry still says
what the feature looks like: ``num_chs`` channels at ``reduction`` of the input. One recorded
forward gives every module's output in the order they finish; the entry's module is the
last one emitting that shape before the first module that emits the next entry's shape (a
later stage started) and before the next entry that does name a module, among the modules
that are not inside one still running then.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..core.boundary import Boundary
from .discovery import MISSING, candidate_boundaries

_MAX_PREFIX_TOKENS = 16  # class, distillation and register tokens before the patch tokens


def record_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, object]]:
    """Every named module's output of one forward of ``x``, in the order the modules finish."""
    seen: list[tuple[str, object]] = []
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: seen.append((name, out)))
        for name, module in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def shape_matches(output: object, batch: int, num_chs: int, reduction: int, input_size: Sequence[int]) -> bool:
    """Whether ``output`` (or a tensor in it) is ``num_chs`` features at ``reduction``, in any layout."""
    if isinstance(output, (tuple, list)):
        return any(shape_matches(o, batch, num_chs, reduction, input_size) for o in output)
    if not isinstance(output, torch.Tensor) or output.ndim < 3 or output.shape[0] != batch:
        return False
    sides = [{s // reduction, math.ceil(s / reduction)} for s in input_size[1:]]
    shape = tuple(output.shape[1:])
    if len(shape) == 3:
        return (shape[0] == num_chs and shape[1] in sides[0] and shape[2] in sides[1]) or (
            shape[2] == num_chs and shape[0] in sides[0] and shape[1] in sides[1]
        )
    tokens = {h * w for h in sides[0] for w in sides[1]}
    return shape[1] == num_chs and any(0 <= shape[0] - t <= _MAX_PREFIX_TOKENS for t in tokens)


def _first_inside(seen: list[tuple[str, object]], module: str) -> int:
    """Where ``module``'s work starts: the first of it or its submodules to finish."""
    return next((j for j, (name, _) in enumerate(seen) if name == module or name.startswith(f"{module}.")), len(seen))


def _finished_within(seen: list[tuple[str, object]], finish: dict[str, int], name: str, stop: int) -> bool:
    """Whether every module around ``name`` ends before ``stop``: a module inside the next stage's
    first block (its input norm) emits the previous stage's shape too, but is not that stage's end."""
    parts = name.split(".")
    return all(finish.get(".".join(parts[:i]), -1) < stop for i in range(1, len(parts)))


def _inside(seen: list[tuple[str, object]], finish: dict[str, int], j: int, shaped: set[int]) -> bool:
    """Whether module ``j`` runs inside a module whose output (index in ``shaped``) has the shape looked
    for: its own shapes are then a block's internals (an attention's keys), not the next stage starting."""
    parts = seen[j][0].split(".")
    return any(finish.get(".".join(parts[:i]), -1) in shaped for i in range(1, len(parts)))


def locate_missing(
    model: nn.Module, boundaries: Sequence[Boundary], x: torch.Tensor, input_size: Sequence[int]
) -> list[Boundary]:
    """``boundaries`` with each one whose module does not exist replaced by the module emitting its shape.

    Located among all of the model's candidate boundaries, whichever of them were asked for: where a
    stage ends depends on where the next one starts.
    """
    if not any(b.problem == MISSING for b in boundaries):
        return list(boundaries)
    found = {b.name: b for b in _locate_all(model, candidate_boundaries(model), x, input_size)}
    return [replace(b, module=found[b.name].module, problem=found[b.name].problem)
            if b.problem == MISSING and b.name in found else b for b in boundaries]


def _locate_all(
    model: nn.Module, boundaries: Sequence[Boundary], x: torch.Tensor, input_size: Sequence[int]
) -> list[Boundary]:
    seen = record_outputs(model, x)
    finish = {name: j for j, (name, _) in enumerate(seen)}
    batch = x.shape[0]

    def fits(index: int, b: Boundary) -> bool:
        return shape_matches(seen[index][1], batch, b.num_chs, b.reduction, input_size)

    located, start = [], -1
    for i, b in enumerate(boundaries):
        if b.problem != MISSING:
            located.append(b)
            start = max(start, next((j for j, (name, _) in enumerate(seen) if name == b.module), start))
            continue
        end = next((_first_inside(seen, n.module) for n in boundaries[i + 1 :] if not n.problem), len(seen))
        later = [n for n in boundaries[i + 1 :] if (n.num_chs, n.reduction) != (b.num_chs, b.reduction)]
        found = [j for j in range(start + 1, end) if fits(j, b)]
        if found:
            shaped = {j for j in range(len(seen)) if fits(j, b)}
            stop = next((j for j in range(found[0], end)
                         if any(fits(j, n) for n in later) and not _inside(seen, finish, j, shaped)), end)
            found = [j for j in found if j < stop and _finished_within(seen, finish, seen[j][0], stop)]
        if not found:
            located.append(replace(b, problem=f"{MISSING}, and no module outputs {b.num_chs} channels at "
                                              f"1/{b.reduction} of the input"))
            continue
        start = found[-1]
        located.append(replace(b, module=seen[start][0], problem=None))
    return located
