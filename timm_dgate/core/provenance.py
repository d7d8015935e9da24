"""Which images a gated model was fit on and tested on, so that calibration can refuse them.

Thresholds chosen on images the gates trained on are too optimistic, and thresholds chosen on
images already reported as the test split make that report meaningless. A split's name says
neither reliably (a training cache labelled ``validation``, a loader over the test images), so
the images themselves are compared: ``cache_features``, a streaming ``fit`` and ``evaluate``
fingerprint every batch they read, ``fit`` and ``evaluate`` record theirs on the model, and
``calibrate`` refuses data that overlaps either beyond :data:`TOLERATED_OVERLAP`.

A fingerprint is a linear hash of an image's float32 bit pattern in wrapping 64-bit integer
arithmetic: exact (the same pixels give the same number whatever the batch, device or order of
summation) and one multiply-add per pixel. Pixels, not pooled features, because a backbone's
features change in the last bits with the batch size. The sets live on the model in memory
only and are not saved: a published folder would otherwise describe its training images. A
model loaded from a folder relies on the validation hold-out its profiles record instead
(``timm_dgate.cli.recipe_data.RecipeData.check_same_holdout``).
"""

from __future__ import annotations

from functools import lru_cache

import torch

# Public data sets hold a few exact duplicates across their splits (CIFAR-10's test set has
# some of its training images); those alone must not block a calibration.
TOLERATED_OVERLAP = 0.01
_ROWS = 64  # images hashed at once: bounds the int64 working copy


@lru_cache(maxsize=8)
def _weights(length: int) -> torch.Tensor:
    """One fixed random 64-bit multiplier per pixel position (the same in every process and run)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(-(2**63), 2**63 - 1, (length,), generator=generator, dtype=torch.int64)


@torch.no_grad()
def image_fingerprints(images: torch.Tensor) -> torch.Tensor:
    """One int64 fingerprint per image of a batch ``(B, ...)``, on the batch's device."""
    bits = images.detach().float().flatten(1).contiguous().view(torch.int32)
    weights = _weights(bits.shape[1]).to(bits.device)
    sums = [(rows.long() * weights).sum(1) for rows in bits.split(_ROWS)]
    return torch.cat(sums) if sums else torch.empty(0, dtype=torch.int64, device=bits.device)


class SeenImages:
    """Fingerprints of the images a model's gates were fit on and that ``evaluate`` measured it on."""

    def __init__(self) -> None:
        self.fit: torch.Tensor | None = None
        self.evaluated: torch.Tensor | None = None

    def record_fit(self, fingerprints: torch.Tensor | None) -> None:
        """The gates were just fit on these images (None: unknown); an earlier fit's no longer matter."""
        self.fit = None if fingerprints is None else fingerprints.cpu().unique()

    def record_evaluated(self, fingerprints: torch.Tensor) -> None:
        """``evaluate`` measured the model on these images: add them to those measured before."""
        known = [] if self.evaluated is None else [self.evaluated]
        self.evaluated = torch.cat([*known, fingerprints.cpu()]).unique()

    def check_calibration(self, fingerprints: torch.Tensor | None) -> None:
        """Refuse calibration images that were fit on or evaluated on (beyond a few duplicates)."""
        if fingerprints is None:  # a cache made without fingerprints (by hand, or saved by an older version)
            return
        fingerprints = fingerprints.cpu()
        n = len(fingerprints)
        for seen, what, how in (
            (self.fit, "the gates were fit on", "thresholds chosen there are too optimistic"),
            (self.evaluated, "evaluate() already measured this model on",
             "the test split must choose nothing"),
        ):
            overlap = 0 if seen is None else int(torch.isin(fingerprints, seen).sum())
            if overlap > TOLERATED_OVERLAP * n:
                raise ValueError(
                    f"{overlap} of the {n} calibration images are images {what} (identical pixels): {how}; "
                    "calibrate on held-out validation images"
                )
