"""Train the demo's timm backbone on Fashion-MNIST (no pretrained weights can be downloaded here)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .data import preprocess


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
        bar = tqdm(range(steps_per_epoch), desc=f"backbone epoch {epoch + 1}/{epochs}", leave=False)
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
