"""Train the demo's timm backbone on Fashion-MNIST (no pretrained weights can be downloaded here)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..fashion_mnist import CLASSES, preprocess
from ..progress import progress_bar


def train_backbone(
    model: nn.Module,
    train: TensorDataset,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 3e-3,
    input_size: int = 32,
    seed: int = 0,
) -> nn.Module:
    """AdamW with a one-cycle schedule and label smoothing; returns the model in eval mode."""
    torch.manual_seed(seed)
    images, labels = train.tensors
    steps_per_epoch = len(labels) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels))
        bar = progress_bar(range(steps_per_epoch), f"backbone epoch {epoch + 1}/{epochs}")
        for step in bar:
            idx = order[step * batch_size : (step + 1) * batch_size]
            x = preprocess(images[idx], input_size, augment=True)
            loss = criterion(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, input_size: int = 32, batch_size: int = 500) -> float:
    """Top-1 accuracy of a plain classifier on a uint8 tensor data set."""
    model.eval()
    images, labels = data.tensors
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = preprocess(images[start : start + batch_size], input_size)
        correct += (model(x).argmax(1) == labels[start : start + batch_size]).sum().item()
    return correct / len(labels)


def cached_backbone(
    name: str,
    train: TensorDataset,
    folder: str | Path,
    *,
    epochs: int = 3,
    input_size: int = 32,
    seed: int = 0,
    retrain: bool = False,
) -> nn.Module:
    """A timm ``name`` trained on Fashion-MNIST, kept in ``folder`` in timm's own layout.

    The first call trains and saves it (``timm.models.save_for_hf``); later calls load it,
    so reruns of the demo and the benchmarks skip training.
    """
    folder = Path(folder)
    model_args = {"in_chans": 1, "num_classes": len(CLASSES)}
    if (folder / "model.safetensors").exists() and not retrain:
        saved = json.loads((folder / "config.json").read_text())["architecture"]
        if saved != name:
            raise ValueError(f"{folder} holds a trained {saved}, not {name}: pass --retrain or another output folder")
        print(f"Backbone: loading the {name} trained earlier from {folder} (--retrain to train again)")
        # timm's own loader for its layout: the saved config carries num_classes, so the head is kept
        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    print(f"Backbone: training timm {name} on Fashion-MNIST for {epochs} epochs")
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **model_args)
    start = time.perf_counter()
    train_backbone(model, train, epochs=epochs, input_size=input_size, seed=seed)
    timm.models.save_for_hf(model, folder, model_args=model_args, safe_serialization=True)
    print(f"  trained in {time.perf_counter() - start:.0f}s, saved to {folder}")
    return model.eval()
