"""Helpers the tests share: batches of the real Fashion-MNIST slice, tiny gated timm models for it, and
multi-process launches that survive a port taken under them."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

import timm_dgate
from timm_dgate.fashion_mnist import TensorBatches

SIZE = 32


def batches(data, batch_size: int = 250) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(TensorBatches(data, SIZE, batch_size))


def tiny_gated(seed: int = 0, gate_hidden: int = 0) -> timm_dgate.GatedModel:
    """Random weights: the plain model scores chance, which ``calibrate`` and ``evaluate`` refuse by default."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=10).eval()
    return timm_dgate.wrap(model, input_size=(1, SIZE, SIZE), gate_hidden=gate_hidden)


def trained_gated(folder: Path, gate_hidden: int = 0) -> timm_dgate.GatedModel:
    """Gates on the ``trained_backbone`` fixture's model, loaded as a user would (timm's local-dir)."""
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    return timm_dgate.wrap(model, input_size=(1, SIZE, SIZE), gate_hidden=gate_hidden)


def hooks(model: nn.Module) -> int:
    """Forward hooks on ``model`` and its submodules: 0 once nothing is attached."""
    return sum(len(m._forward_hooks) for m in model.modules())


def run_launch(args: Sequence[str], attempts: int = 3, **kwargs: object) -> subprocess.CompletedProcess:
    """Run a command that starts distributed processes; again if another program took its port first.

    The launches ask for port 0, so the OS picks a free one, but the launcher releases it before
    torch binds it, and on a shared machine someone else may take it in between.
    """
    for _ in range(attempts):
        done = subprocess.run(args, capture_output=True, text=True, **kwargs)
        if done.returncode == 0 or "EADDRINUSE" not in done.stderr:
            break
    return done
