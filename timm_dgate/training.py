"""Train every gate against the frozen backbone, on one process or many (Accelerate).

Default path: one backbone pass caches every gate's pooled features (``timm_dgate.cache``),
then the gates train on that cache with full-batch Adam: each epoch is one pass over the
cache, its gradient summed across processes, so every rank takes identical steps and a
run on N processes matches a one-process run up to float summation order. The streaming
path (``stream=True``) runs the backbone every step instead, for augmented data.

Gates train on standardised features and the standardisation is folded back into each
gate's linear layer afterwards, so a trained gate is still exactly ``d = W^T x - b``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .cache import DEFAULT_MAX_MEMORY, FeatureCache, cache_features, check_labels
from .distributed import Reducer
from .losses import check_gate_loss, gate_loss
from .progress import progress_bar
from .provenance import image_fingerprints

if TYPE_CHECKING:
    from .model import GatedModel


@dataclass
class FitReport:
    """What a fit did: per-gate training accuracy and final loss, samples seen, processes used."""

    loss: str
    epochs: int
    num_samples: int
    num_processes: int
    train_accuracy: list[float] = field(default_factory=list)
    final_loss: list[float] = field(default_factory=list)


class _GateTrainer:
    """Linear gates on standardised features, stepped by globally summed gradients."""

    def __init__(
        self,
        dims: list[int],
        num_classes: int,
        mean: list[torch.Tensor],
        std: list[torch.Tensor],
        loss: str,
        lr: float,
        reg: float,
        reducer: Reducer,
        device: torch.device,
    ):
        self.linears = nn.ModuleList(nn.Linear(d, num_classes) for d in dims).to(device)
        for linear in self.linears:  # zero start: the problem is convex, so no seed is needed here
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.mean, self.std = mean, std
        self.loss_fn = gate_loss(loss)
        self.reg = reg
        self.reducer = reducer
        self.optimizer = torch.optim.Adam(self.linears.parameters(), lr=lr)

    def margins(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """``W (x - mean) / std + b``, with the scale applied to ``W`` rather than to every sample.

        Centring stays on the features: folding the mean into the bias too would make the
        weight gradient a difference of large sums, and N processes would drift apart.
        """
        return [
            nn.functional.linear(f.float() - self.mean[k], linear.weight / self.std[k], linear.bias)
            for k, (linear, f) in enumerate(zip(self.linears, features))
        ]

    def step(self, batches: Iterable[tuple[list[torch.Tensor], torch.Tensor]], total: int) -> list[float]:
        """One optimiser step on the mean loss over ``total`` samples, spread over processes."""
        self.optimizer.zero_grad(set_to_none=False)
        device = self.linears[0].weight.device
        losses = torch.zeros(len(self.linears), device=device)
        for features, labels in batches:
            labels = labels.to(device)
            per_gate = torch.stack(
                [self.loss_fn(m, labels, reduction="sum") for m in self.margins([f.to(device) for f in features])]
            )
            (per_gate.sum() / total).backward()
            losses += per_gate.detach()
        for param in self.linears.parameters():
            param.grad = self.reducer.sum(param.grad)
        reg = 0.0
        for linear in self.linears:
            linear.weight.grad += 2 * self.reg * linear.weight.detach()
            reg += self.reg * linear.weight.detach().square().sum()
        self.optimizer.step()
        return (self.reducer.sum(losses) / total + reg).tolist()

    @torch.no_grad()
    def fold_into(self, gates: nn.ModuleList) -> None:
        """Write the trained gates into the model's, as plain ``d = W' x + b'``."""
        for gate, linear, mean, std in zip(gates, self.linears, self.mean, self.std):
            weight = linear.weight / std
            gate.fc.weight.copy_(weight)
            gate.fc.bias.copy_(linear.bias - weight @ mean)


def _feature_stats(
    batches: Iterable[tuple[list[torch.Tensor], torch.Tensor]], reducer: Reducer, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Global per-feature mean and std of each gate's input, and the global sample count."""
    sums = sq = None
    count = torch.zeros((), device=device, dtype=torch.float64)
    for features, _ in batches:
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


def fit(
    model: GatedModel,
    data: Iterable | FeatureCache,
    *,
    loss: str = "hinge",
    epochs: int = 300,
    lr: float = 0.2,
    reg: float = 1e-4,
    stream: bool = False,
    stats_batches: int = 20,
    accelerator: object | None = None,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY,
    spill_dir: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FitReport:
    """Train every gate of ``model`` against its frozen backbone.

    Args:
        data: a loader of ``(images, labels)`` batches (this process's shard under
            Accelerate), or a :class:`~timm_dgate.cache.FeatureCache` made earlier.
        loss: ``hinge`` (the paper's gates) or ``ce`` (the cross-entropy baseline).
        epochs: passes over the data; on the cache each pass is one full-batch Adam step.
        lr, reg: Adam learning rate (cosine-decayed) and the L2 weight ``lambda ||W||^2``.
        stream: run the backbone every step (minibatch steps) instead of caching features;
            use it with augmented loaders. Feature statistics come from ``stats_batches`` batches.
        accelerator: an ``accelerate.Accelerator``; gradients are summed across its processes.

    The backbone is frozen for good (``requires_grad`` off, BatchNorm statistics kept in eval
    mode); its parameters and buffers are left bit-identical. Records the loss in the model's
    config and switches its exit score to the loss's natural one (``margin`` for hinge,
    ``softmax`` for ce), and the training images (``model.seen_images``, every process's), which
    ``calibrate`` then refuses.
    """
    check_gate_loss(loss)
    torch.manual_seed(seed)
    reducer = Reducer(accelerator)
    device = next(model.parameters()).device
    model.freeze_backbone()
    progress = progress and reducer.is_main
    if stream:
        stats_source = _pooled_batches(model, data, limit=stats_batches)
    else:
        if not isinstance(data, FeatureCache):
            data = cache_features(
                model, data, max_memory_bytes=max_memory_bytes, spill_dir=spill_dir, progress=progress
            )
        stats_source = data.chunks()
    mean, std, total = _feature_stats(stats_source, reducer, device)
    trainer = _GateTrainer(
        [g.fc.in_features for g in model.gates], model.num_classes, mean, std, loss, lr, reg, reducer, device
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optimizer, T_max=max(1, epochs))
    last: list[float] = []
    streamed: list[torch.Tensor] = []  # fingerprints of the images of the first streamed epoch
    bar = progress_bar(range(epochs), f"fitting {model.num_gates} {loss} gates", enabled=progress)
    for epoch in bar:
        if stream:
            for features, labels in _pooled_batches(model, data, seen=streamed if epoch == 0 else None):
                batch_total = int(reducer.sum(torch.tensor(float(len(labels)), device=device)).item())
                last = trainer.step([(features, labels)], batch_total)
        else:
            last = trainer.step(data.chunks(), total)
        schedule.step()
        bar.set_postfix(loss=f"{sum(last) / len(last):.4f}", refresh=False)
    trainer.fold_into(model.gates)
    model.set_gate_loss(loss)
    fingerprints = (torch.cat(streamed) if streamed else None) if stream else data.fingerprints
    model.seen_images.record_fit(None if fingerprints is None else reducer.gather_rows(fingerprints))
    accuracy = _train_accuracy(model, data, reducer, device) if isinstance(data, FeatureCache) else []
    return FitReport(loss, epochs, total, reducer.num_processes, accuracy, last)


def _pooled_batches(
    model: GatedModel, loader: Iterable, limit: int | None = None, seen: list[torch.Tensor] | None = None
):
    """Pooled features and labels per batch; the images' fingerprints are appended to ``seen`` if given."""
    device = next(model.parameters()).device
    for i, (images, labels) in enumerate(loader):
        if limit is not None and i >= limit:
            return
        check_labels(torch.as_tensor(labels), model.num_classes)
        if seen is not None:
            seen.append(image_fingerprints(images))
        with torch.no_grad():
            pooled, _ = model.forward_pooled(images.to(device))
        yield pooled, labels


def _train_accuracy(model: GatedModel, cache: FeatureCache, reducer: Reducer, device: torch.device) -> list[float]:
    """Each gate's accuracy on the whole training set: correct counts summed over every process's shard."""
    correct = [(m.argmax(1) == cache.labels).sum() for m in cache.margins(model.gates)]
    counts = torch.tensor([*correct, len(cache)], dtype=torch.float64, device=device)
    counts = reducer.sum(counts)
    return (counts[:-1] / counts[-1]).tolist()

