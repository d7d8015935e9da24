"""Evaluate threshold profiles on a held-out split: accuracy, FLOPs, wall-clock, exits.

Accuracy and exits come from the real early-exit forward (not a simulation), FLOPs from
each sample's exit position, and wall-clock from the gated and the plain model timed side
by side on the same preloaded batches, alternating (``timm_dgate.evaluation.timing``), so machine noise
hits both alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch

from ..calibration.calibrate import check_plain_accuracy
from ..core.cache import check_labels
from ..core.contract import ExitModel
from ..core.provenance import image_fingerprints
from ..progress import progress_bar
from .results import EvalReport, ProfileResult
from .timing import interleaved, per_image


def _batches(data: Iterable, device: torch.device, num_classes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in data:
        labels = torch.as_tensor(labels)
        check_labels(labels, num_classes)
        yield images.to(device), labels.to(device)


def _timing_batches(data: Iterable, device: torch.device, images: int, num_classes: int) -> list[torch.Tensor]:
    taken, out = 0, []
    for x, _ in _batches(data, device, num_classes):
        out.append(x)
        taken += len(x)
        if taken >= images:
            break
    return out


@contextmanager
def eval_mode(model: ExitModel) -> Iterator[None]:
    """Eval mode inside (dropout off, batch norm statistics frozen); the caller's train/eval mode after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


@torch.inference_mode()
def evaluate(
    model: ExitModel,
    data: Iterable,
    profiles: Sequence[str] | None = None,
    *,
    split: str = "test",
    timing_images: int = 2048,
    repeats: int = 3,
    record: bool = False,
    progress: bool = True,
    allow_chance_accuracy: bool = False,
) -> EvalReport:
    """Run every profile (default: all stored) over ``data`` and time it against the plain model.

    ``model`` is a :class:`~timm_dgate.GatedModel` or a :class:`~timm_dgate.Cascade` (whose
    plain model is its last member alone).

    ``data`` yields ``(images, labels)`` batches and is iterated once per profile plus once
    for the plain model; its first ``timing_images`` images are preloaded for timing. With
    ``record=True`` each profile's metrics are also written into ``profile.test`` (and so into
    what ``save_pretrained`` writes). Each profile runs by being passed per call
    (``model(x, profile=...)``), never switched on the model, so another thread using the same
    model meanwhile keeps its own policy; train/eval mode is left as found. The model remembers
    the images it was measured on (``model.seen_images``), and a later ``calibrate`` on them is
    refused.

    A plain model at about chance accuracy on ``data`` raises :class:`~timm_dgate.ChanceAccuracyError`
    before any profile runs, unless ``allow_chance_accuracy=True``.
    """
    names = list(profiles if profiles is not None else model.profiles)
    device = next(model.parameters()).device
    plain = model.plain_forward  # a cascade's resizes the batch for its last member
    num_classes, head = model.num_classes, model.num_gates
    with eval_mode(model):
        correct = total = 0
        seen = []
        for x, y in progress_bar(_batches(data, device, num_classes), "plain model", enabled=progress):
            correct += (plain(x).argmax(1) == y).sum().item()
            total += len(y)
            seen.append(image_fingerprints(x))
        if not allow_chance_accuracy:
            check_plain_accuracy(correct / total, num_classes, split, total)
        model.seen_images.record_evaluated(torch.cat(seen))  # calibrate refuses these images from now on
        timing = _timing_batches(data, device, timing_images, num_classes)
        results = []
        for name in progress_bar(names, f"profiles on {split}", enabled=progress):
            policy = model.policy_for(name)  # for these calls only: the model's own policy stays as it is
            profile = model.profiles[name]
            counts = torch.zeros(head + 1, num_classes, dtype=torch.long)  # images per (exit, class)
            right, flops = torch.zeros_like(counts), 0.0  # of them classified right; FLOPs so far
            for x, y in _batches(data, device, num_classes):
                out = model(x, return_exits=True, profile=policy)
                cell = (out.exits * num_classes + y).cpu()  # (exit, class) of each image
                hit = (out.logits.argmax(1) == y).cpu()
                counts += torch.bincount(cell, minlength=(head + 1) * num_classes).view(head + 1, num_classes)
                right += torch.bincount(cell[hit], minlength=(head + 1) * num_classes).view(head + 1, num_classes)
                flops += model.costs.average(out.exits, policy.thresholds) * len(y)
            gated = partial(model, profile=policy)
            seconds = interleaved({"gated": (gated, timing), "plain": (plain, timing)}, repeats)
            result = ProfileResult(
                name=name,
                thresholds=profile.thresholds,
                accuracy=right.sum().item() / total,
                gflops=flops / total / 1e9,
                flops_reduction=1 - flops / total / model.costs.backbone,
                ms_per_image=per_image(seconds["gated"], timing) * 1e3,
                plain_ms_per_image=per_image(seconds["plain"], timing) * 1e3,
                exit_fractions=(counts.sum(1).double() / total).tolist(),
                exits_per_class=counts.tolist(),
                correct_per_class=right.tolist(),
            )
            if record:
                profile.test = {
                    "split": split,
                    "accuracy": result.accuracy,
                    "gflops": result.gflops,
                    "flops_reduction": result.flops_reduction,
                    "speedup": result.speedup,
                    "plain_accuracy": correct / total,
                }
            results.append(result)
    return EvalReport(split, total, correct / total, model.costs.backbone / 1e9, results)
