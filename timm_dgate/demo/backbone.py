"""Train the demo's timm backbone on Fashion-MNIST (no pretrained weights can be downloaded here)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..fashion_mnist import CLASSES, preprocess, timm_data_config
from ..progress import progress_bar

TRAINING_RECORD = "training.json"


@dataclass
class TrainingRecord:
    """How a backbone was trained, kept next to its weights so every number measured on it can say so.

    ``val_accuracy`` holds the validation accuracy after each epoch when a validation split was
    given: :meth:`plateau_gain` tells whether training had converged (the benchmarks ask for a
    gain under 0.2 points over the last 3 epochs).
    """

    model: str
    epochs: int
    seconds: float
    val_accuracy: list[float] = field(default_factory=list)
    device: str = "cpu"  # what trained it ("NVIDIA H200", ...): ``seconds`` mean little without it

    def plateau_gain(self, window: int = 3) -> float | None:
        """Validation accuracy gained over the last ``window`` epochs, in points (None without the history)."""
        if len(self.val_accuracy) <= window:
            return None
        return 100 * (self.val_accuracy[-1] - self.val_accuracy[-1 - window])

    def save(self, folder: Path) -> None:
        (folder / TRAINING_RECORD).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> TrainingRecord | None:
        """The record saved with the backbone in ``folder``, or None for a folder trained before records existed."""
        path = Path(folder) / TRAINING_RECORD
        return cls(**json.loads(path.read_text())) if path.exists() else None


def train_backbone(
    model: nn.Module,
    train: TensorDataset,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 3e-3,
    input_size: int = 32,
    seed: int = 0,
    val: TensorDataset | None = None,
) -> list[float]:
    """AdamW with a one-cycle schedule and label smoothing; leaves the model in eval mode.

    Trains on the model's device: move it to a GPU first and the data follows (Fashion-MNIST
    fits in GPU memory as uint8, so batches never cross the bus). Returns the validation
    accuracy after each epoch when ``val`` is given (empty otherwise): the evidence that a
    backbone has converged.
    """
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    images, labels = (t.to(device) for t in train.tensors)
    steps_per_epoch = len(labels) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    history: list[float] = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels))
        bar = progress_bar(range(steps_per_epoch), f"backbone epoch {epoch + 1}/{epochs}")
        for step in bar:
            idx = order[step * batch_size : (step + 1) * batch_size].to(device)
            x = preprocess(images[idx], input_size, augment=True)
            loss = criterion(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if val is not None:
            history.append(accuracy(model, val, input_size))
            print(f"  epoch {epoch + 1}/{epochs}: validation accuracy {100 * history[-1]:.2f}%", flush=True)
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, input_size: int = 32, batch_size: int = 500) -> float:
    """Top-1 accuracy of a plain classifier on a uint8 tensor data set, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    images, labels = (t.to(device) for t in data.tensors)
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = preprocess(images[start : start + batch_size], input_size)
        correct += (model(x).argmax(1) == labels[start : start + batch_size]).sum().item()
    return correct / len(labels)


def trained_cfg(model: nn.Module, name: str, input_size: int) -> dict[str, Any]:
    """The ``pretrained_cfg`` of a backbone trained here, which timm's ``save_for_hf`` writes into ``config.json``.

    timm's default for the architecture describes its ImageNet weights (a tag such as
    ``a1_in1k``, 224 px, ImageNet mean/std, a resize and crop): anything that follows timm's
    conventions would preprocess this model wrongly. This one says what training fed it
    (:func:`~timm_dgate.fashion_mnist.timm_data_config`) and claims no pretrained source.
    """
    default = model.pretrained_cfg
    return {
        "architecture": name,
        "num_classes": len(CLASSES),
        "label_names": list(CLASSES),
        **timm_data_config(input_size),
        "first_conv": default.get("first_conv"),
        "classifier": default.get("classifier"),
        "description": f"trained from scratch on Fashion-MNIST ({input_size} px, zero-padded) by timm_dgate",
    }


def device_name(device: torch.device) -> str:
    """The hardware behind ``device``, as a training record names it."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _save(model: nn.Module, folder: Path, name: str, input_size: int) -> None:
    model.pretrained_cfg = trained_cfg(model, name, input_size)
    model_args = {"in_chans": 1, "num_classes": len(CLASSES)}
    timm.models.save_for_hf(model, folder, model_args=model_args, safe_serialization=True)


def cached_backbone(
    name: str,
    train: TensorDataset,
    folder: str | Path,
    *,
    epochs: int = 3,
    input_size: int = 32,
    seed: int = 0,
    retrain: bool = False,
    val: TensorDataset | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A timm ``name`` trained on Fashion-MNIST, kept in ``folder`` in timm's own layout.

    The first call trains and saves it (``timm.models.save_for_hf``) with its real preprocessing
    in ``config.json`` (:func:`trained_cfg`); later calls load it, so reruns of the demo and the
    benchmarks skip training. A folder saved by an older timm_dgate, whose ``config.json``
    carries timm's ImageNet defaults, gets that config rewritten: the weights are unchanged.
    Training also writes a :class:`TrainingRecord` (``training.json``; the validation curve
    when ``val`` is given) next to the weights. ``device`` is where training runs (``"cuda"``:
    minutes instead of hours for the benchmarks' long schedules); the model comes back on the CPU.
    """
    folder = Path(folder)
    if (folder / "model.safetensors").exists() and not retrain:
        config = json.loads((folder / "config.json").read_text())
        saved = config["architecture"]
        if saved != name:
            raise ValueError(f"{folder} holds a trained {saved}, not {name}: pass --retrain or another output folder")
        print(f"Backbone: loading the {name} trained earlier from {folder} (--retrain to train again)")
        # timm's own loader for its layout: the saved config carries num_classes, so the head is kept
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        expected = json.loads(json.dumps(trained_cfg(model, name, input_size)))  # as config.json holds it
        saved_cfg = config.get("pretrained_cfg", {})
        if "tag" in saved_cfg or any(saved_cfg.get(k) != v for k, v in expected.items() if k != "architecture"):
            _save(model, folder, name, input_size)
            print(f"  rewrote {folder / 'config.json'}: it described timm's defaults for {name}, "
                  "not the preprocessing the backbone was trained with")
        return model
    print(f"Backbone: training timm {name} on Fashion-MNIST for {epochs} epochs")
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=len(CLASSES)).to(device)
    start = time.perf_counter()
    history = train_backbone(model, train, epochs=epochs, input_size=input_size, seed=seed, val=val)
    seconds = time.perf_counter() - start
    model.cpu()
    _save(model, folder, name, input_size)
    TrainingRecord(name, epochs, round(seconds, 1), history, device_name(torch.device(device))).save(folder)
    print(f"  trained in {seconds:.0f}s, saved to {folder}")
    return model.eval()
