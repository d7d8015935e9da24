"""Throughput of a gated model's profiles against the plain model, batch size by batch size.

Early exit pays off differently at each batch size (a batch runs a stage while any of its
samples is left), so images/s is measured per batch size, on real images whose exits are
the ones the profile makes, with the gated and plain models timed alternately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .evaluate import time_side_by_side
from .model import GatedModel


@dataclass
class Throughput:
    batch_size: int
    profile: str
    images_per_s: float
    plain_images_per_s: float

    @property
    def speedup(self) -> float:
        return self.images_per_s / self.plain_images_per_s


@torch.inference_mode()
def throughput(
    model: GatedModel, images: torch.Tensor, batch_sizes: Sequence[int], profiles: Sequence[str], repeats: int = 3
) -> list[Throughput]:
    """Images/s of each profile and of the plain model on ``images``, cut into batches of each size."""
    model.eval()
    active = model.active_profile
    rows = []
    for size in batch_sizes:
        batches = list(images.split(size))
        for name in profiles:
            model.use_profile(name)
            gated_s, plain_s = time_side_by_side(model, model.base_model, batches, repeats)
            rows.append(Throughput(size, name, 1 / gated_s, 1 / plain_s))
    if active is not None:
        model.use_profile(active)
    return rows


def format_throughput(rows: Sequence[Throughput]) -> str:
    lines = ["| batch size | profile | images/s | plain images/s | speed-up |", "|---|---|---|---|---|"]
    lines += [
        f"| {r.batch_size} | {r.profile} | {r.images_per_s:.1f} | {r.plain_images_per_s:.1f} | {r.speedup:.2f}x |"
        for r in rows
    ]
    return "\n".join(lines)
