"""Shared fixtures: a small slice of the real Fashion-MNIST (helpers live in tests/helpers.py)."""

from __future__ import annotations

import pytest

from timm_dgate.fashion_mnist import load_splits

from .hub_server import intercept_hub


@pytest.fixture(scope="session")
def fmnist():
    """Train / validation / test slices of the real Fashion-MNIST (Debian's package)."""
    return load_splits(val_size=1000, limit=1000)


@pytest.fixture
def intercepted_hub(monkeypatch):
    """huggingface_hub's repo, branch and commit calls intercepted and recorded (see tests/hub_server.py)."""
    return intercept_hub(monkeypatch)
