"""Shared fixtures: a small slice of the real Fashion-MNIST, and a tiny gated timm model for it."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_dgate
from timm_dgate.demo.data import TensorBatches, load_splits

SIZE = 32


@pytest.fixture(scope="session")
def fmnist():
    """Train / validation / test slices of the real Fashion-MNIST (Debian's package)."""
    return load_splits(val_size=1000, limit=1000)


def batches(data, batch_size: int = 250):
    return list(TensorBatches(data, SIZE, batch_size))


def tiny_gated(seed: int = 0) -> timm_dgate.GatedModel:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=10).eval()
    return timm_dgate.wrap(model, input_size=(1, SIZE, SIZE))
