"""Wall-clock timing that survives a noisy machine: variants interleaved on the same batches, medians kept.

Every comparison timm_dgate reports (evaluation, ``timm-dgate bench``, benchmarks/) goes through
:func:`interleaved`: one warm-up pass per variant, then the variants take turns, in alternating
order, so load from elsewhere hits them alike; a ratio is the median of per-repeat ratios
(``paired_ratio`` in benchmarks/common.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

Run = Callable[[torch.Tensor], object]


@torch.inference_mode()
def time_pass(run: Run, batches: Sequence[torch.Tensor]) -> float:
    """Seconds to push every batch through ``run`` (CUDA work included)."""
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    if batches and batches[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(timed: dict[str, tuple[Run, Sequence[torch.Tensor]]], repeats: int) -> dict[str, list[float]]:
    """Per variant, the seconds of each repeat; variants take turns, reversing the order every repeat."""
    for run, batches in timed.values():
        time_pass(run, batches)  # warm-up: one whole pass
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    for r in range(repeats):
        order = list(timed) if r % 2 == 0 else list(reversed(timed))  # no fixed neighbour
        for name in order:
            seconds[name].append(time_pass(*timed[name]))
    return seconds


def per_image(seconds: Sequence[float], batches: Sequence[torch.Tensor]) -> float:
    """Median seconds per image over repeats."""
    return statistics.median(seconds) / sum(len(b) for b in batches)
