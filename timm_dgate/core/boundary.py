"""``Boundary``: one place a gate can sit, as data (found by ``timm_dgate.boundaries``, stored in the config)."""

from __future__ import annotations

from dataclasses import dataclass

from timm.layers import Format
from torch import nn

# timm's feature formats a gate can read, plus "NC" for a stage that already emits pooled features
LAYOUTS = (Format.NCHW.value, Format.NHWC.value, Format.NLC.value, "NC")


@dataclass(frozen=True)
class Boundary:
    """One place a gate can sit: the end of a stage (or block) of the backbone.

    ``layout`` is the feature layout the module emits (``NCHW``, ``NHWC``, tokens ``NLC``)
    and is filled in by the probe; ``part`` is the element a gate reads when the module
    outputs a tuple or list (None: one tensor); ``realign`` says that a later layer takes a
    tensor from before the boundary, so the engine cuts that too. ``default`` marks the
    default gate placement; ``problem`` says why the boundary is refused (no module for it,
    or the probe failed); :func:`timm_dgate.stages` lists such boundaries,
    :func:`timm_dgate.wrap` raises. ``gflops`` is the backbone's cost up to it, where listed.
    """

    name: str
    module: str
    num_chs: int
    reduction: int
    layout: str | None = None
    default: bool = False
    problem: str | None = None
    part: int | None = None
    realign: bool = False
    gflops: float | None = None

def model_name(model: nn.Module) -> str:
    """A readable name for messages: timm's architecture name where known."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__
