"""How gates step on features: working copies of their heads on standardised features, moved by gradients
summed over every process, then folded back into the model's gates.

Gates train on standardised features and the standardisation is folded back into each
gate's first linear layer afterwards, so a trained linear gate is still exactly ``d = W^T x - b``
and any gate runs without a normalisation layer of its own. ``timm_dgate.fitting.training``
drives the epochs; this module knows nothing of caches or loaders.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ..core.losses import gate_loss
from .distributed import Reducer

Batch = tuple[list[torch.Tensor], torch.Tensor, "list[torch.Tensor] | None"]  # features, targets, per-gate weights


class GateTrainer:
    """Working copies of the gates' layers on standardised features, stepped by globally summed gradients."""

    def __init__(
        self,
        gates: nn.ModuleList,
        mean: list[torch.Tensor],
        std: list[torch.Tensor],
        loss: str,
        lr: float,
        reg: float,
        reducer: Reducer,
        device: torch.device,
    ):
        self.heads = nn.ModuleList(copy.deepcopy(gate.layers()).float() for gate in gates).to(device)
        for head in self.heads:
            if len(head) == 1:  # a linear gate: convex, so a zero start needs no seed
                nn.init.zeros_(head[0].weight)
                nn.init.zeros_(head[0].bias)
                continue
            for layer in head.modules():  # any other head: a fresh start from fit's seed, the same on every process
                if layer is not head and hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
        self.mean, self.std = mean, std
        self.loss_fn = gate_loss(loss)
        self.reg = reg
        self.reducer = reducer
        self.optimizer = torch.optim.Adam(self.heads.parameters(), lr=lr)

    @property
    def device(self) -> torch.device:
        return self.heads[0][0].weight.device

    def margins(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """``head((x - mean) / std)``, with the scale applied to the first layer's ``W`` rather than to every sample.

        Centring stays on the features: folding the mean into the bias too would make the
        weight gradient a difference of large sums, and N processes would drift apart.
        """
        out = []
        for k, (head, f) in enumerate(zip(self.heads, features)):
            first, rest = head[0], head[1:]
            out.append(rest(nn.functional.linear(f.float() - self.mean[k], first.weight / self.std[k], first.bias)))
        return out

    def step(self, batch: Batch, totals: torch.Tensor) -> torch.Tensor:
        """One optimiser step on each gate's (weighted) mean loss over a global batch.

        ``batch`` is this process's share; ``totals`` ``(K,)`` the batch's global weight per
        gate. Returns this process's summed loss per gate (not yet reduced across processes).
        """
        self.optimizer.zero_grad(set_to_none=False)
        device = self.device
        features, targets, weights = batch
        targets = targets.to(device)
        per_gate = []
        for k, margins in enumerate(self.margins([f.to(device) for f in features])):
            per_sample = self.loss_fn(margins, targets, reduction="none")
            per_gate.append((per_sample if weights is None else per_sample * weights[k].to(device)).sum())
        per_gate = torch.stack(per_gate)
        (per_gate / totals.clamp_min(1e-12)).sum().backward()  # a gate weighing no sample here gets no gradient
        for param in self.heads.parameters():
            param.grad = self.reducer.sum(param.grad)
        for layers in self._linear_layers():
            for layer in layers:
                layer.weight.grad += 2 * self.reg * layer.weight.detach()
        self.optimizer.step()
        return per_gate.detach()

    def penalty(self) -> list[float]:
        """Each gate's L2 term ``reg * ||W||^2`` over its linear layers."""
        return [
            self.reg * sum(layer.weight.detach().square().sum().item() for layer in layers)
            for layers in self._linear_layers()
        ]

    def _linear_layers(self) -> list[list[nn.Linear]]:
        """Per gate, the linear layers the L2 term weighs."""
        return [[m for m in head.modules() if isinstance(m, nn.Linear)] for head in self.heads]

    @torch.no_grad()
    def fold_into(self, gates: nn.ModuleList) -> None:
        """Write the trained layers into the model's gates, the standardisation folded into the first layer."""
        for gate, head, mean, std in zip(gates, self.heads, self.mean, self.std):
            state = head.state_dict()
            weight = head[0].weight / std
            state["0.weight"] = weight
            state["0.bias"] = head[0].bias - weight @ mean
            gate.layers().load_state_dict(state)


def feature_stats(
    batches: Iterable[tuple[list[torch.Tensor], torch.Tensor]], reducer: Reducer, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Global per-feature mean and std of each gate's input, and the global sample count."""
    sums = sq = None
    count = torch.zeros((), device=device, dtype=torch.float64)
    for features, *_ in batches:
        feats = [f.to(device, torch.float64) for f in features]
        if sums is None:
            sums = [torch.zeros(f.shape[1], device=device, dtype=torch.float64) for f in feats]
            sq = [torch.zeros_like(s) for s in sums]
        for k, f in enumerate(feats):
            sums[k] += f.sum(0)
            sq[k] += f.square().sum(0)
        count += len(feats[0])
    if sums is None:
        raise ValueError("no training data: the loader or cache is empty")
    count = reducer.sum(count)
    means = [reducer.sum(s) / count for s in sums]
    stds = [(reducer.sum(q) / count - m.square()).clamp_min(0).sqrt().clamp_min(1e-6) for q, m in zip(sq, means)]
    return [m.float() for m in means], [s.float() for s in stds], int(count.item())
