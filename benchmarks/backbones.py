"""Fashion-MNIST backbones for the method comparison, trained here once and cached in timm's layout.

Why a script of its own: training is the slow part (minutes per epoch on 2 cores), is shared
by every method compared, and must happen before any timing run. Each model lands in
``runs/backbones/<model>`` through :func:`timm_dgate.demo.backbone.cached_backbone`, so a
rerun loads it instead of training again. Each model's plain validation and test accuracy,
FLOPs and training record (epochs, seconds, the validation curve and whether it plateaued)
go to ``runs/bench/plain/<model>.json``: that is all the comparison needs of the smaller
static models (``STATIC``).

    .venv/bin/python benchmarks/backbones.py --models resnet18 resnet50 convnext_atto resnet10t convnext_zepto_rms
    .venv/bin/python benchmarks/backbones.py --models resnet18 --epochs 20 --root runs/longer  # another schedule
    python benchmarks/backbones.py --models resnet50 --epochs 40 --device cuda  # the same recipe on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks.*`

from benchmarks.common import RECORDS, ROOT, backbone_folder, load_backbone
from timm_dgate.core.costs import count_flops
from timm_dgate.demo.backbone import TrainingRecord, accuracy
from timm_dgate.fashion_mnist import load_splits

PLATEAU_POINTS = 0.2  # converged: less validation accuracy than this gained over the last 3 epochs


def record(
    name: str, model: nn.Module, training: TrainingRecord | None, val: TensorDataset, test: TensorDataset,
    input_size: int = 32, device: str = "cpu",
) -> dict:
    """Plain accuracy on both splits, FLOPs per image (FlopCounterMode, as the gated models), how it was trained."""
    gain = training.plateau_gain() if training else None
    model.to(device)
    entry = {
        "model": name,
        "epochs": training.epochs if training else None,
        "train_seconds": training.seconds if training else None,
        "trained_on": training.device if training else None,
        "val_curve": training.val_accuracy if training else [],
        "gain_last_3_epochs": gain,
        "converged": gain is not None and gain < PLATEAU_POINTS,
        "val_accuracy": accuracy(model, val, input_size),
        "accuracy": accuracy(model, test, input_size),
    }
    model.cpu()
    return {**entry, "gflops": count_flops(model, torch.zeros(1, 1, input_size, input_size)) / 1e9}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--epochs", type=int, help="train missing backbones this long (default: EPOCHS in common.py)")
    parser.add_argument("--device", default="cpu", help="where to train and evaluate (cuda: the same recipe, faster)")
    args = parser.parse_args(argv)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels (a no-op on the CPU)
    splits = load_splits()
    RECORDS.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        start = time.perf_counter()
        model = load_backbone(name, splits, args.root, args.epochs, args.device)
        print(f"{name}: ready in {time.perf_counter() - start:.0f}s", flush=True)
        training = TrainingRecord.load(backbone_folder(name, args.root))
        entry = record(name, model, training, splits.val, splits.test, device=args.device)
        (RECORDS / f"{name}.json").write_text(json.dumps(entry, indent=1))
        print(f"  {entry}", flush=True)


if __name__ == "__main__":
    main()
