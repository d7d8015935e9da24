"""Train every gate against the frozen backbone, on one process or many (Accelerate).

Default path: one backbone pass caches every gate's pooled features (``timm_dgate.core.cache``),
then the gates train on that cache with mini-batch Adam. A batch is a global set of images
(``timm_dgate.fitting.minibatches``: chosen by fingerprint, not by shard), each process steps on its
share and the gradients are summed, so every rank takes identical steps and a run on N
processes matches a one-process run up to float summation order. The streaming path
(``stream=True``) runs the backbone every step instead, for augmented data. How the gates
step on a batch (standardised features, folded back afterwards) is ``timm_dgate.fitting.trainer``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.cache import DEFAULT_MAX_MEMORY, FeatureCache, cache_features, check_labels
from ..core.contract import GatedBackbone
from ..core.gates import gate_head
from ..core.losses import check_gate_loss
from ..core.provenance import image_fingerprints
from ..core.scores import exit_score
from ..progress import progress_bar
from .distributed import Reducer
from .minibatches import epoch_batches
from .trainer import GateTrainer, feature_stats

DEFAULT_EPOCHS = 20  # passes over the training cache
DEFAULT_BATCH_SIZE = 1024  # images per Adam step on a cache


@dataclass
class FitReport:
    """What a fit did: per-gate training accuracy and final loss, samples seen, processes used."""

    loss: str
    epochs: int
    num_samples: int
    num_processes: int
    train_accuracy: list[float] = field(default_factory=list)
    final_loss: list[float] = field(default_factory=list)


def fit(
    model: GatedBackbone,
    data: Iterable | FeatureCache,
    *,
    loss: str = "hinge",
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    lr: float | None = None,
    reg: float = 1e-4,
    stream: bool = False,
    stats_batches: int = 20,
    accelerator: object | None = None,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY,
    spill_dir: str | None = None,
    seed: int = 0,
    progress: bool = True,
    distill: float = 0.0,
    sample_weights: Sequence[torch.Tensor] | None = None,
) -> FitReport:
    """Train every gate of ``model`` against its frozen backbone.

    Args:
        data: a loader of ``(images, labels)`` batches (this process's shard under
            Accelerate), or a :class:`~timm_dgate.core.cache.FeatureCache` made earlier.
        loss: ``hinge`` (the paper's gates) or ``ce`` (the cross-entropy baseline).
        epochs: passes over the data.
        batch_size: images per Adam step on a cache, across all processes (``None``: the whole
            cache, one full-batch step per epoch). A streamed fit steps once per loader batch.
        lr, reg: Adam learning rate (cosine-decayed; default: the ``default_lr`` the model's gate
            head was registered with, so MLP gates do not diverge at the linear gates' rate) and
            the L2 weight ``lambda ||W||^2``.
        stream: run the backbone every step (minibatch steps) instead of caching features;
            use it with augmented loaders. Feature statistics come from ``stats_batches`` batches.
        accelerator: an ``accelerate.Accelerator``; gradients are summed across its processes.
        distill: weight of the backbone's own softmax in each gate's target, the rest on the
            one-hot label (``ce`` only): an exit that agrees with the head it replaces loses no
            accuracy by exiting, which is what a target of "accuracy within x points" asks.
        sample_weights: one ``(N,)`` weight per gate for the rows of a feature cache, e.g.
            :func:`survivor_weights`, so each gate learns most from the samples that reach it.

    The backbone is frozen for good (``requires_grad`` off, BatchNorm statistics kept in eval
    mode); its parameters and buffers are left bit-identical. Records the loss in the model's
    config and switches its exit score to the loss's natural one (``margin`` for hinge,
    ``softmax`` for ce), and the training images (``model.seen_images``, every process's), which
    ``calibrate`` then refuses.
    """
    check_gate_loss(loss)
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill weighs the backbone's predictions in the targets: in [0, 1], got {distill}")
    if distill and loss != "ce":
        raise ValueError(f"distill={distill} needs loss='ce': a {loss} gate trains on hard labels only")
    if sample_weights is not None and (stream or not isinstance(data, FeatureCache)):
        raise ValueError("sample_weights are per row of a FeatureCache: pass the cache they were computed on")
    if sample_weights is not None and (
        len(sample_weights) != model.num_gates or any(len(w) != len(data) for w in sample_weights)
    ):
        raise ValueError(f"sample_weights needs {model.num_gates} tensors of {len(data)} weights (one per cached row)")
    if epochs < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
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
    mean, std, total = feature_stats(stats_source, reducer, device)
    if lr is None:
        lr = gate_head(model.config.gate_head).default_lr
    trainer = GateTrainer(model.gates, mean, std, loss, lr, reg, reducer, device)
    title = f"fitting {model.num_gates} {loss} gates"
    if stream:
        last, fingerprints = _fit_streamed(trainer, model, data, distill, epochs, title, progress)
    else:
        num_batches = 1 if batch_size is None else max(1, -(-total // batch_size))
        last = _fit_cached(trainer, data, distill, sample_weights, epochs, num_batches, title, progress)
        fingerprints = data.fingerprints
    trainer.fold_into(model.gates)
    model.set_gate_loss(loss, distill)
    model.seen_images.record_fit(None if fingerprints is None else reducer.gather_rows(fingerprints))
    accuracy = _train_accuracy(model, data, reducer, device) if isinstance(data, FeatureCache) else []
    return FitReport(loss, epochs, total, reducer.num_processes, accuracy, last)


def _fit_cached(
    trainer: GateTrainer,
    cache: FeatureCache,
    distill: float,
    sample_weights: Sequence[torch.Tensor] | None,
    epochs: int,
    num_batches: int,
    title: str,
    progress: bool,
) -> list[float]:
    """Mini-batch Adam on a cache, cosine-decayed over every step; returns the last epoch's loss per gate.

    Rows join batches by their images' fingerprints (row numbers when a hand-made cache has
    none: then only a one-process fit is reproducible across process counts).
    """
    device = trainer.device
    reducer = trainer.reducer
    keys = cache.fingerprints if cache.fingerprints is not None else torch.arange(len(cache))
    targets = _targets(cache.labels, cache.logits, distill)
    weights = torch.ones(1, len(cache)) if sample_weights is None else torch.stack(list(sample_weights))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optimizer, T_max=epochs * num_batches)
    last: list[float] = []
    bar = progress_bar(range(epochs), title, enabled=progress)
    for epoch in bar:
        batches = epoch_batches(keys, epoch, num_batches)
        totals = reducer.sum(torch.stack([weights[:, rows].sum(1) for rows in batches], 1).to(device))
        totals = totals.expand(len(trainer.heads), num_batches)
        loss_sums = torch.zeros(len(trainer.heads), device=device)
        for rows, batch_totals in zip(batches, totals.unbind(1)):
            if not batch_totals.any():  # no process holds a row of this batch: no step anywhere
                continue
            batch_weights = None if sample_weights is None else [w[rows] for w in sample_weights]
            loss_sums += trainer.step(([f[rows] for f in cache.features], targets[rows], batch_weights), batch_totals)
            schedule.step()
        epoch_loss = reducer.sum(loss_sums) / totals.sum(1).clamp_min(1e-12)
        last = [loss + penalty for loss, penalty in zip(epoch_loss.tolist(), trainer.penalty())]
        bar.set_postfix(loss=f"{sum(last) / len(last):.4f}", refresh=False)
    return last


def _fit_streamed(
    trainer: GateTrainer,
    model: GatedBackbone,
    loader: Iterable,
    distill: float,
    epochs: int,
    title: str,
    progress: bool,
) -> tuple[list[float], torch.Tensor | None]:
    """Adam steps on pooled features computed batch by batch (cosine-decayed per epoch).

    Returns the last batch's loss per gate and the fingerprints of the first epoch's images.
    """
    device = trainer.device
    reducer = trainer.reducer
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optimizer, T_max=epochs)
    last: list[float] = []
    seen: list[torch.Tensor] = []
    bar = progress_bar(range(epochs), title, enabled=progress)
    for epoch in bar:
        for features, labels, logits in _pooled_batches(model, loader, seen=seen if epoch == 0 else None):
            batch_total = reducer.sum(torch.tensor(float(len(labels)), device=device))
            batch = (features, _targets(labels, logits, distill), None)
            loss_sums = trainer.step(batch, batch_total.expand(len(features)))
            batch_loss = reducer.sum(loss_sums) / batch_total.clamp_min(1e-12)
            last = [loss + penalty for loss, penalty in zip(batch_loss.tolist(), trainer.penalty())]
        schedule.step()
        bar.set_postfix(loss=f"{sum(last) / len(last):.4f}", refresh=False)
    return last, torch.cat(seen) if seen else None


def _pooled_batches(
    model: GatedBackbone, loader: Iterable, limit: int | None = None, seen: list[torch.Tensor] | None = None
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
            pooled, logits = model.forward_pooled(images.to(device))
        yield pooled, labels, logits


def _targets(labels: torch.Tensor, logits: torch.Tensor, distill: float) -> torch.Tensor:
    """Hard labels, or ``(1 - distill) * one_hot(label) + distill * softmax(backbone logits)``."""
    labels = torch.as_tensor(labels)
    if not distill:
        return labels
    one_hot = nn.functional.one_hot(labels.long(), logits.shape[1]).to(logits.device, torch.float32)
    return (1.0 - distill) * one_hot + distill * logits.float().softmax(1)


@torch.no_grad()
def survivor_weights(model: GatedBackbone, cache: FeatureCache, floor: float = 0.1) -> list[torch.Tensor]:
    """Per gate, weight 1 on the cached samples that reach it under the model's thresholds, ``floor`` elsewhere.

    A gate only ever sees the samples its earlier gates kept: after a first ``fit`` and
    ``calibrate``, refitting with these weights spends each gate's capacity on them
    (the floor keeps the rest from being forgotten). Closed gates send nobody away.
    """
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], got {floor}")
    reached = torch.ones(len(cache), dtype=torch.bool)
    weights = []
    for margins, threshold in zip(cache.margins(model.gates), model.thresholds):
        weights.append(torch.where(reached, 1.0, floor))
        if threshold != float("inf"):
            reached &= exit_score(margins, model.exit_score) < threshold
    return weights


def _train_accuracy(model: GatedBackbone, cache: FeatureCache, reducer: Reducer, device: torch.device) -> list[float]:
    """Each gate's accuracy on the whole training set: correct counts summed over every process's shard."""
    correct = [(m.argmax(1) == cache.labels).sum() for m in cache.margins(model.gates)]
    counts = torch.tensor([*correct, len(cache)], dtype=torch.float64, device=device)
    counts = reducer.sum(counts)
    return (counts[:-1] / counts[-1]).tolist()

