"""FLOPs of a gated model, counted by ``torch.utils.flop_counter.FlopCounterMode``.

Convention (the paper's and BlockDrop's): 2 FLOPs per multiply-add, for one image at the
model's input size; like FlopCounterMode, element-wise work (norms, activations, pooling)
is not counted, for the backbone and the gates alike. A gate that is closed (threshold
+inf) is never evaluated and so costs nothing; an open gate is paid by every sample that
reaches it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class GateCosts:
    """FLOPs per image: the backbone up to each gate, each gate itself, and the whole backbone."""

    to_gate: tuple[float, ...]
    gate: tuple[float, ...]
    backbone: float

    @property
    def num_gates(self) -> int:
        return len(self.gate)

    @property
    def full(self) -> float:
        """The whole backbone plus every gate (what a sample pays when all gates are open)."""
        return self.backbone + sum(self.gate)

    def exit_costs(self, open_gates: Sequence[bool] | None = None) -> torch.Tensor:
        """Cost ``(K + 1,)`` of leaving at gate k (last entry: the head), with every open gate passed paid."""
        if open_gates is None:
            open_gates = [True] * self.num_gates
        paid = torch.tensor([g if o else 0.0 for g, o in zip(self.gate, open_gates)], dtype=torch.float64)
        spent = paid.cumsum(0)
        at_gates = torch.tensor(self.to_gate, dtype=torch.float64) + spent
        return torch.cat([at_gates, (self.backbone + paid.sum()).reshape(1)])

    def keep_gates(self, keep: Sequence[int]) -> GateCosts:
        """The costs once only the gates ``keep`` remain (the backbone is unchanged)."""
        return GateCosts(tuple(self.to_gate[k] for k in keep), tuple(self.gate[k] for k in keep), self.backbone)

    def cumulative(self) -> tuple[float, ...]:
        """Cost of reaching and evaluating each gate with every gate open (grows gate by gate)."""
        return tuple(self.exit_costs()[:-1].tolist())

    def average(self, exits: torch.Tensor, thresholds: Sequence[float] | None = None) -> float:
        """Mean FLOPs per image of a run, given each sample's exit index and the thresholds in force."""
        open_gates = None if thresholds is None else [t != math.inf for t in thresholds]
        return self.exit_costs(open_gates)[exits.cpu()].mean().item()


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Turn timm's fused attention off while counting: FlopCounterMode misses it on the CPU."""
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for module in fused:
        module.fused_attn = False
    try:
        yield
    finally:
        for module in fused:
            module.fused_attn = True


@torch.no_grad()
def count_flops(module: nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs of one forward of ``module`` (a private copy: other threads may be calling it)."""
    module = copy.deepcopy(module)
    with unfused_attention(module), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return float(counter.get_total_flops())


def costs_to(
    model: nn.Module, modules: Sequence[str], input_size: Sequence[int], parts: Sequence[int | None] | None = None
) -> tuple[tuple[float, ...], list[torch.Tensor], float]:
    """One counted pass: FLOPs up to each of ``modules``, what each emits there (the element ``parts[k]``
    of a tuple or list output), and the whole backbone's FLOPs.

    Runs with autograd on (one image): FlopCounterMode's module tracker hooks every tensor that
    requires grad, and under ``no_grad`` a view of a parameter (CaiT's ``cls_token.expand``)
    requires grad without a grad_fn, which the tracker cannot hook. Counts a private copy of the
    model: the counting hooks, eval mode and unfused attention stay off the model other threads
    may be calling, and their forwards cannot leak into the count.
    """
    model = copy.deepcopy(model)
    parts = list(parts) if parts is not None else [None] * len(modules)
    param = next(model.parameters())
    x = torch.zeros((1, *input_size), device=param.device, dtype=param.dtype)  # bf16/fp16 models count alike
    snapshots: dict[int, tuple[float, torch.Tensor]] = {}
    counter = FlopCounterMode(display=False)

    def snapshot(k: int, module: nn.Module, args: object, output: object) -> None:
        feature = output if parts[k] is None else output[parts[k]]  # type: ignore[index]
        feature = feature.detach() if isinstance(feature, torch.Tensor) else feature
        snapshots.setdefault(k, (float(counter.get_total_flops()), feature))

    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, a, o, k=k: snapshot(k, m, a, o)
        )
        for k, name in enumerate(modules)
    ]
    model.eval()
    try:
        with unfused_attention(model), torch.enable_grad(), counter:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    to_gate = tuple(snapshots[k][0] for k in range(len(modules)))
    return to_gate, [snapshots[k][1] for k in range(len(modules))], float(counter.get_total_flops())


def measure_costs(
    model: nn.Module,
    modules: Sequence[str],
    gates: Sequence[nn.Module],
    input_size: Sequence[int],
    parts: Sequence[int | None] | None = None,
) -> GateCosts:
    """Count the backbone up to each of ``modules`` (one pass) and each gate on what that module emits."""
    to_gate, outputs, backbone = costs_to(model, modules, input_size, parts)
    gate = tuple(count_flops(g, out) for g, out in zip(gates, outputs))
    return GateCosts(to_gate=to_gate, gate=gate, backbone=backbone)


@dataclass(frozen=True)
class CascadeCosts:
    """FLOPs per image of a cascade: each member's :class:`GateCosts`, in run order.

    Exits are numbered as the cascade runs them (member 0's gates, its head, member 1's gates,
    ...); a member's head is one more exit whose cost is the whole member. A member whose exits
    are all closed is skipped, so it costs nothing; the last member always runs for what reaches
    it. It answers the same questions as :class:`GateCosts`, so one threshold search covers
    every exit of every member; ``backbone`` is the last member's, the plain model a cascade
    with every exit closed is.
    """

    members: tuple[GateCosts, ...]

    @property
    def num_gates(self) -> int:
        """Thresholded exits: every member's gates and every head but the last."""
        return sum(m.num_gates + 1 for m in self.members) - 1

    @property
    def backbone(self) -> float:
        return self.members[-1].backbone

    @property
    def full(self) -> float:
        """Every member and every gate run (what a sample pays when all exits are open and it leaves last)."""
        return sum(m.full for m in self.members)

    def exit_costs(self, open_gates: Sequence[bool] | None = None) -> torch.Tensor:
        """Cost ``(K + 1,)`` of leaving at each exit: earlier members that run, paid whole, plus this one up to it."""
        flags = list(open_gates) if open_gates is not None else [True] * self.num_gates
        if len(flags) != self.num_gates:
            raise ValueError(f"expected {self.num_gates} open flags (one per exit but the last), got {len(flags)}")
        out, spent, start = [], 0.0, 0
        for i, member in enumerate(self.members):
            last = i == len(self.members) - 1
            own = flags[start : start + member.num_gates + (0 if last else 1)]
            start += len(own)
            costs = member.exit_costs(own[: member.num_gates])
            out.append(spent + costs)
            if any(own):  # the member runs for everyone who gets past it
                spent += costs[-1].item()
        return torch.cat(out)

    def average(self, exits: torch.Tensor, thresholds: Sequence[float] | None = None) -> float:
        """Mean FLOPs per image of a run, given each sample's exit index and the thresholds in force."""
        open_gates = None if thresholds is None else [t != math.inf for t in thresholds]
        return self.exit_costs(open_gates)[exits.cpu()].mean().item()
