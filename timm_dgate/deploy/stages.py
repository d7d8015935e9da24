"""A model with exits as a list of stages: the work before each exit (with that exit's gate), then the head.

The hook engine runs a gated model through timm's own forward, so a batch must go from the input
to the logits in one call. Executors that move samples between calls need the model cut at its
exits instead: the refill executor pools the survivors of several batches before each stage
(``timm_dgate.deploy.refill``), a server runs each stage as a deployment of its own. The cut is
the one ``export`` writes to files (``timm_dgate.deploy.segments.exit_chain``, checked to be the
whole forward), so a model that exports has stages, and an exported folder's runtime already is
one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.contract import GatedBackbone, RunnableExitModel
from ..errors import ExportError
from .segments import Chain, exit_chain

# step k: features at the input of stage k -> (features for stage k + 1, gate k's margins)
Step = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
Head = Callable[[torch.Tensor], torch.Tensor]  # features after the last exit -> logits


class GatedSegment(nn.Module):
    """A segment that ends at a gate: its features, for the next segment, and the gate's margins."""

    def __init__(self, segment: nn.Module, gate: nn.Module):
        super().__init__()
        self.segment, self.gate = segment, gate

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.segment(x)
        return features, self.gate(features)


@dataclass(frozen=True)
class Stages:
    """One step per exit and the head, with where and in which dtype their input lives."""

    steps: tuple[Step, ...]
    head: Head
    device: torch.device
    dtype: torch.dtype

    @property
    def num_gates(self) -> int:
        return len(self.steps)


def _first(run: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> Head:
    return lambda x: run(x)[0]


def chain_modules(gated: GatedBackbone, example: torch.Tensor) -> tuple[list[GatedSegment], Chain, list[list[str]]]:
    """The modules of ``gated``'s stages (``exit_chain``'s cut, each gate after its segment), the head's, and
    the backbone module names each runs. Raises :class:`~timm_dgate.errors.ExportError` where the forward is
    not that chain."""
    if any(b.part is not None for b in gated.boundaries):
        raise ExportError("cannot cut this model into stages: a gate reads one part of its stage's tuple output")
    backbone = gated.base_model
    pieces = exit_chain(backbone, [b.module for b in gated.boundaries], example)
    chains = [Chain([backbone.get_submodule(n) for n in names]).eval() for names in pieces]
    steps = [GatedSegment(chain, gate).eval() for chain, gate in zip(chains, gated.gates)]
    return steps, chains[-1], pieces


@torch.no_grad()
def stages_of(model: RunnableExitModel) -> Stages:
    """``model`` cut at its exits: an exported folder's runtime (its segment files) or a gated model in eval
    mode whose forward is a chain of its segments (the families ``export`` takes; others raise
    :class:`~timm_dgate.errors.ExportError` saying why). A cascade has no stages of one backbone."""
    segments = getattr(model, "segments", None)
    if isinstance(segments, list) and segments and not isinstance(model, nn.Module):  # the exported runtime
        return Stages(tuple(segments[:-1]), _first(segments[-1]), torch.device("cpu"), model.dtype)
    if not all(hasattr(model, name) for name in ("base_model", "gates", "boundaries")):
        raise ExportError(f"a {type(model).__name__} has no stages of one backbone: run a cascade's members one by one")
    gated: GatedBackbone = model  # type: ignore[assignment]
    if gated.training:
        raise ValueError("the gated model is in train mode, where no sample exits: call .eval() first")
    param = next(gated.parameters())
    example = torch.randn((2, *gated.input_size), generator=torch.Generator().manual_seed(0))
    steps, head, _ = chain_modules(gated, example.to(param.device, param.dtype))
    return Stages(tuple(steps), head, param.device, param.dtype)
