"""FLOPs of a gated model, counted by ``torch.utils.flop_counter.FlopCounterMode``.

Convention (the paper's and BlockDrop's): 2 FLOPs per multiply-add, for one image at the
model's input size; like FlopCounterMode, element-wise work (norms, activations, pooling)
is not counted, for the backbone and the gates alike. A gate that is closed (threshold
+inf) is never evaluated and so costs nothing; an open gate is paid by every sample that
reaches it.
"""

from __future__ import annotations

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
    """FLOPs of one forward of ``module``."""
    with unfused_attention(module), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return float(counter.get_total_flops())


@torch.no_grad()
def costs_to(
    model: nn.Module, modules: Sequence[str], input_size: Sequence[int], parts: Sequence[int | None] | None = None
) -> tuple[tuple[float, ...], list[torch.Tensor], float]:
    """One counted pass: FLOPs up to each of ``modules``, what each emits there (the element ``parts[k]``
    of a tuple or list output), and the whole backbone's FLOPs."""
    parts = list(parts) if parts is not None else [None] * len(modules)
    param = next(model.parameters())
    x = torch.zeros((1, *input_size), device=param.device, dtype=param.dtype)  # bf16/fp16 models count alike
    snapshots: dict[int, tuple[float, torch.Tensor]] = {}
    counter = FlopCounterMode(display=False)

    def snapshot(k: int, module: nn.Module, args: object, output: object) -> None:
        feature = output if parts[k] is None else output[parts[k]]  # type: ignore[index]
        snapshots.setdefault(k, (float(counter.get_total_flops()), feature))

    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, a, o, k=k: snapshot(k, m, a, o)
        )
        for k, name in enumerate(modules)
    ]
    was_training = model.training
    model.eval()
    try:
        with unfused_attention(model), counter:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
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
