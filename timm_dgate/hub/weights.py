"""Safetensors files, read without pickle, with a :class:`~timm_dgate.HubFormatError` that names a bad file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import HubFormatError


def load_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` on the CPU; ``what`` says whose weights they are in errors."""
    if not path.is_file():
        raise HubFormatError(f"{what} file {path.name} is missing from {path.parent}")
    with _invalid_file(path, what):
        return load_file(str(path), device="cpu")


def check_weights(path: Path, what: str) -> None:
    """Parse the header, which also checks the file is as long as it says, without loading tensors."""
    with _invalid_file(path, what), safe_open(str(path), framework="pt") as f:
        f.keys()


@contextmanager
def _invalid_file(path: Path, what: str) -> Iterator[None]:
    try:
        yield
    except (SafetensorError, OSError, ValueError) as error:
        raise HubFormatError(
            f"{path} ({what}) is not a valid safetensors file, corrupted or truncated: {error}"
        ) from error
