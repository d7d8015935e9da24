"""Throughput of a gated model's profiles against the plain model, batch size by batch size.

Early exit pays off differently at each batch size (a batch runs a stage while any of its
samples is left), so images/s is measured per batch size, on real images whose exits are
the ones the profile makes, with the gated and plain models timed alternately.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from ..core.contract import ExitModel
from .evaluate import eval_mode
from .results import Throughput
from .timing import interleaved, per_image


@torch.inference_mode()
def throughput(
    model: ExitModel, images: torch.Tensor, batch_sizes: Sequence[int], profiles: Sequence[str], repeats: int = 3
) -> list[Throughput]:
    """Images/s of each profile and of the plain model on ``images``, cut into batches of each size.

    ``model`` is a :class:`~timm_dgate.GatedModel` or a :class:`~timm_dgate.Cascade` (plain: its last member).

    Each profile is passed per call, never switched on the model (as in ``evaluate``); train/eval
    mode is left as found.
    """
    rows = []
    with eval_mode(model):
        for size in batch_sizes:
            batches = list(images.split(size))
            for name in profiles:
                gated = partial(model, profile=model.policy_for(name))
                seconds = interleaved({"gated": (gated, batches), "plain": (model.plain_forward, batches)}, repeats)
                rows.append(
                    Throughput(size, name, 1 / per_image(seconds["gated"], batches),
                               1 / per_image(seconds["plain"], batches))
                )
    return rows
