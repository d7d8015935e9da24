"""Shared fixtures: a small slice of the real Fashion-MNIST, a tiny backbone trained on it, and the Hub stand-ins of
tests/hub_server.py (helpers live in tests/helpers.py). Tests marked ``slow`` are skipped unless ``--runslow`` is
given (``.venv/bin/python -m pytest --runslow tests/test_serve.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from timm_dgate.demo.backbone import cached_backbone
from timm_dgate.fashion_mnist import load_splits

from .hub_server import FakeHub, intercept_hub


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub pointed at a FakeHub (tests/hub_server.py), with its cache in tmp_path; online until a test
    says otherwise."""
    hub = FakeHub()
    hub.thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        yield hub
    finally:
        hub.server.shutdown()
        hub.server.server_close()
