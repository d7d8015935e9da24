"""Work across processes through Accelerate: sums for gate training, gathers for calibration.

Everything here is a no-op on one process, so the library runs the same code with or without
``accelerate launch``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.cache import FeatureCache


class Reducer:
    """Sums and gathers tensors across the processes of an ``accelerate.Accelerator`` (or none)."""

    def __init__(self, accelerator: Any | None):
        self.accelerator = accelerator

    @property
    def num_processes(self) -> int:
        return getattr(self.accelerator, "num_processes", 1)

    @property
    def is_main(self) -> bool:
        return getattr(self.accelerator, "is_main_process", True)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over every process, on every process."""
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="sum")

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows of ``tensor``, concatenated in rank order, on every process (ragged sizes too)."""
        if self.num_processes == 1:
            return tensor
        accelerator = self.accelerator
        local = tensor.to(accelerator.device)
        sizes = accelerator.gather(torch.tensor([len(local)], device=accelerator.device)).tolist()
        padded = accelerator.pad_across_processes(local, dim=0)
        rows = accelerator.gather(padded).cpu()
        width = len(padded)
        return torch.cat([rows[r * width : r * width + n] for r, n in enumerate(sizes)])

    def gather_cache(self, cache: FeatureCache) -> FeatureCache:
        """Every process's shard of a feature cache, concatenated on every process."""
        if self.num_processes == 1:
            return cache
        features = [self.gather_rows(f) for f in cache.features]
        fingerprints = None if cache.fingerprints is None else self.gather_rows(cache.fingerprints)
        return FeatureCache(
            features, self.gather_rows(cache.logits), self.gather_rows(cache.labels), cache.split, fingerprints
        )
