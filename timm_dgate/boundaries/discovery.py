"""Stage discovery: where in a timm model a decision gate can sit.

Every timm model lists its stage ends in ``model.feature_info``. Those names are the
candidate boundaries; a small registry lets a family override the candidates or the default
placement, or supply the forward the exit engine runs (``timm_dgate.boundaries.adapters``).
Whether a boundary really works as an early-exit point is checked by a probe
(``timm_dgate.boundaries.probe``), not assumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from torch import nn

from ..core.boundary import Boundary, model_name
from ..core.engine import Forward
from ..errors import UnsupportedModelError

BoundaryFn = Callable[[nn.Module], list[Boundary]]
PlacementFn = Callable[[list[Boundary]], list[int]]


@dataclass(frozen=True)
class FamilyRule:
    """Overrides for one timm family (a ``timm.models`` module name such as ``resnet``)."""

    boundaries: BoundaryFn | None = None
    placement: PlacementFn | None = None
    unsupported: str | None = None
    forward: Forward | None = None


_FAMILY_RULES: dict[str, FamilyRule] = {}


def register_family(
    family: str,
    *,
    boundaries: BoundaryFn | None = None,
    placement: PlacementFn | None = None,
    unsupported: str | None = None,
    forward: Forward | None = None,
) -> None:
    """Teach timm_dgate about a family: its boundaries, its default placement, or why it can't be gated.

    ``family`` is the timm module that defines the model class, e.g. ``"resnet"`` or
    ``"vision_transformer"`` (see :func:`family_of`). ``forward(model, x) -> logits`` is run by
    the exit engine instead of ``model(x)``: the model's own computation, rewritten so that no
    batch size read before a boundary is used after it (exited samples leave the batch there).
    What is not given stays as registered before, so a placement override keeps a built-in forward.
    """
    given = {"boundaries": boundaries, "placement": placement, "unsupported": unsupported, "forward": forward}
    rule = _FAMILY_RULES.get(family, FamilyRule())
    _FAMILY_RULES[family] = replace(rule, **{field: value for field, value in given.items() if value is not None})


def family_forward(model: nn.Module) -> Forward | None:
    """The forward the exit engine runs for ``model``: its family's adapter, or None for ``model(x)``."""
    return _FAMILY_RULES.get(family_of(model), FamilyRule()).forward


def family_of(model: nn.Module) -> str:
    """The timm module name that defines ``model``'s class (``"resnet"``, ``"vision_transformer"``...)."""
    return type(model).__module__.rsplit(".", 1)[-1]



MISSING = "feature_info names a module that does not exist in the model"


def resolve_module(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Find the module a gate hooks; a container that is never called itself resolves to its last child.

    A name that is not a module path is looked up as the unique path ending in it
    (``blocks.3`` for ``encoder.blocks.3``); the probe then matches what is still missing by
    output shape (``timm_dgate.boundaries.locate``).
    """
    try:
        module = model.get_submodule(name) if name else model
    except AttributeError:
        ends = [n for n, _ in model.named_modules() if n.endswith(f".{name}")]
        if len(ends) != 1:
            raise UnsupportedModelError(model_name(model), MISSING, name) from None
        name, module = ends[0], model.get_submodule(ends[0])
    if not name:
        raise UnsupportedModelError(model_name(model), "feature_info names the whole model", name)
    while isinstance(module, nn.ModuleList) and len(module):
        name = f"{name}.{len(module) - 1}"
        module = module[-1]
    return name, module


def feature_boundaries(model: nn.Module) -> list[Boundary]:
    """Candidate boundaries from ``model.feature_info``."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise UnsupportedModelError(model_name(model), "it has no feature_info listing its stages")
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    boundaries, named = [], set()
    for entry in entries:
        if entry["module"] in named:  # one entry per branch of the same module (crossvit): the first one's
            continue
        named.add(entry["module"])
        module, problem = entry["module"], None
        try:
            module, _ = resolve_module(model, module)
        except UnsupportedModelError as error:  # listed by stages(), refused by wrap()
            problem = error.reason
        boundaries.append(
            Boundary(
                name=entry["module"],
                module=module,
                num_chs=int(entry["num_chs"]),
                reduction=int(entry["reduction"]),
                problem=problem,
            )
        )
    return boundaries


def default_placement(boundaries: Sequence[Boundary], num_plain_gates: int = 3) -> list[int]:
    """Indices of the boundaries that get a gate by default.

    Staged networks (reduction grows): after every stage but the last, skipping stems at
    reduction below 4. Plain transformers (one reduction throughout): ``num_plain_gates``
    evenly spaced blocks, since a gate after each of 12 blocks costs more than it saves.
    """
    count = len(boundaries)
    if count < 2:
        return []
    if len({b.reduction for b in boundaries}) == 1:
        slots = min(num_plain_gates, count - 1)
        return sorted({round(count * (i + 1) / (slots + 1)) - 1 for i in range(slots)})
    return [i for i, b in enumerate(boundaries[:-1]) if b.reduction >= 4]


def candidate_boundaries(model: nn.Module) -> list[Boundary]:
    """Boundaries for ``model`` with the default placement marked, family rules applied."""
    rule = _FAMILY_RULES.get(family_of(model), FamilyRule())
    if rule.unsupported:
        raise UnsupportedModelError(model_name(model), rule.unsupported)
    boundaries = (rule.boundaries or feature_boundaries)(model)
    chosen = set((rule.placement or default_placement)(boundaries))
    return [replace(b, default=i in chosen) for i, b in enumerate(boundaries)]


def _blocks_of(module: nn.Module) -> list[str]:
    """Relative names of the blocks a stage runs in sequence: its own children when it is a
    ``Sequential``/``ModuleList``, else those of its last such child (after a downsample, the blocks)."""
    if isinstance(module, (nn.Sequential, nn.ModuleList)):
        return [name for name, _ in module.named_children()]
    lists = [(n, c) for n, c in module.named_children() if isinstance(c, (nn.Sequential, nn.ModuleList))]
    if not lists:
        return []
    name, child = lists[-1]
    return [f"{name}.{sub}" for sub, _ in child.named_children()]


def block_boundaries(model: nn.Module, stages: Sequence[Boundary]) -> list[Boundary]:
    """Every block end of probed ``stages``: a stage of blocks becomes one boundary per block, each
    expecting its stage's layout, and the stage itself for the last block; any other stage stays.

    The blocks still need probing (``timm_dgate.boundaries.probe``): their channels come from their output.
    """
    expanded: list[Boundary] = []
    for stage in stages:
        owner = stage.name if _is_module(model, stage.name) else stage.module
        names = [f"{owner}.{b}" for b in _blocks_of(model.get_submodule(owner))] if not stage.problem else []
        if len(names) < 2 or stage.module not in (owner, names[-1]):
            expanded.append(stage)
            continue
        expanded += [replace(stage, name=n, module=n, default=False, part=None, realign=False) for n in names[:-1]]
        expanded.append(stage)  # the last block's end is the stage's
    seen: set[str] = set()
    return [b for b in expanded if not (b.module in seen or seen.add(b.module))]


def _is_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return bool(name)


def select_boundaries(
    model: nn.Module, gates: Sequence[str | int] | None, boundaries: Sequence[Boundary] | None = None
) -> list[Boundary]:
    """The boundaries named by ``gates`` (indices or module names) among ``boundaries`` (default:
    the candidates from ``feature_info``), or the default ones."""
    boundaries = list(boundaries) if boundaries is not None else candidate_boundaries(model)
    if gates is None:
        chosen = [b for b in boundaries if b.default]
        if not chosen:
            raise UnsupportedModelError(model_name(model), "it has no stage boundary before its last stage")
        return chosen
    by_name = {b.name: b for b in boundaries} | {b.module: b for b in boundaries}
    chosen = []
    for gate in gates:
        if isinstance(gate, int) and not isinstance(gate, bool):
            if not -len(boundaries) <= gate < len(boundaries):
                raise ValueError(
                    f"gate index {gate} is out of range: {model_name(model)} has "
                    f"{len(boundaries)} boundaries ({', '.join(b.name for b in boundaries)})"
                )
            chosen.append(boundaries[gate])
        elif gate in by_name:
            chosen.append(by_name[gate])
        else:
            raise ValueError(
                f"unknown gate position {gate!r} for {model_name(model)}; boundaries are "
                f"{', '.join(b.name for b in boundaries)}"
            )
    modules = [b.module for b in chosen]
    if len(set(modules)) != len(modules):
        raise ValueError(f"gate positions {list(gates)} name the same boundary twice")
    order = {b.module: i for i, b in enumerate(boundaries)}
    return sorted(chosen, key=lambda b: order[b.module])
