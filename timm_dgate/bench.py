"""Throughput of a gated model's profiles against the plain model, batch size by batch size.

Early exit pays off differently at each batch size (a batch runs a stage while any of its
samples is left), so images/s is measured per batch size, on real images whose exits are
the ones the profile makes, with the gated and plain models timed alternately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .evaluation import kept_state
from .timing import interleaved, per_image

if TYPE_CHECKING:
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
    """Images/s of each profile and of the plain model on ``images``, cut into batches of each size.

    ``model`` is a :class:`~timm_dgate.GatedModel` or a :class:`~timm_dgate.Cascade` (plain: its last member).

    The model's thresholds, active profile and mode are left as they were.
    """
    rows = []
    with kept_state(model):
        model.eval()
        for size in batch_sizes:
            batches = list(images.split(size))
            for name in profiles:
                model.use_profile(name)
                seconds = interleaved({"gated": (model, batches), "plain": (model.plain_forward, batches)}, repeats)
                rows.append(
                    Throughput(size, name, 1 / per_image(seconds["gated"], batches),
                               1 / per_image(seconds["plain"], batches))
                )
    return rows
