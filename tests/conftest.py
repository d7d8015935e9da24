"""Shared fixtures: a small slice of the real Fashion-MNIST and a tiny backbone trained on it (helpers live in
tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from timm_dgate.demo.backbone import cached_backbone
from timm_dgate.fashion_mnist import load_splits

from .hub_server import intercept_hub


@pytest.fixture(scope="session")
def fmnist():
    """Train / validation / test slices of the real Fashion-MNIST (Debian's package)."""
    return load_splits(val_size=1000, limit=1000)


@pytest.fixture(scope="session")
def trained_backbone(tmp_path_factory, fmnist) -> Path:
    """A timm ``test_resnet`` trained on the slice as the demo trains its backbone (~70% accuracy, seconds), saved
    in timm's layout by the demo's own code: a working model, for what a random one (at chance) cannot test."""
    folder = tmp_path_factory.mktemp("trained") / "backbone"
    cached_backbone("test_resnet", fmnist.train, folder, epochs=8)
    return folder


@pytest.fixture
def intercepted_hub(monkeypatch):
    """huggingface_hub's repo, branch and commit calls intercepted and recorded (see tests/hub_server.py)."""
    return intercept_hub(monkeypatch)
