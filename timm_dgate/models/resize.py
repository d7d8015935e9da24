"""One batch for every cascade member: each reads it resized to its own input size."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..core.provenance import image_fingerprints


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` at a member's ``(C, H, W)``: bilinear (antialiased when shrinking); channels must match."""
    if x.ndim != 4:
        raise ValueError(f"a cascade takes image batches (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != size[0]:
        raise ValueError(f"the batch has {x.shape[1]} channels; the member takes {size[0]} (input size {tuple(size)})")
    if tuple(x.shape[-2:]) == tuple(size[1:]):
        return x
    shrink = x.shape[-2] > size[1] or x.shape[-1] > size[2]
    # antialiased resizing has no bfloat16/float16 kernel on every device: resize in float32, hand back the dtype
    source = x.float() if shrink and x.dtype in (torch.bfloat16, torch.float16) else x
    resized = nn.functional.interpolate(source, size=tuple(size[1:]), mode="bilinear", align_corners=False,
                                        antialias=shrink)
    return resized.to(x.dtype)


def resized_batches(
    data: Iterable, size: Sequence[int], fingerprints: list[torch.Tensor] | None = None
) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(images, labels)`` batches of ``data`` resized for one member; the originals' fingerprints go to
    ``fingerprints`` if given (they tell passes over the data apart, and what the cascade has seen)."""
    for images, labels in data:
        if fingerprints is not None:
            fingerprints.append(image_fingerprints(images))
        yield resize(images, size), labels
