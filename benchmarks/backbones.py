"""Fashion-MNIST backbones for the method comparison, trained here once and cached in timm's layout.

Why a script of its own: training is the slow part (minutes per epoch on 2 cores), is shared
by every method compared, and must happen before any timing run. Each model lands in
``runs/backbones/<model>`` through :func:`timm_dgate.demo.backbone.cached_backbone`, so a
rerun loads it instead of training again. Each model's plain validation and test accuracy
and FLOPs go to ``runs/bench/plain/<model>.json``: that is all the comparison needs of the
smaller static models (``STATIC``).

    .venv/bin/python benchmarks/backbones.py --models resnet18 resnet50 convnext_atto resnet10t convnext_zepto_rms
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import RECORDS, ROOT, backbone_epochs, load_backbone
from torch import nn
from torch.utils.data import TensorDataset

from timm_dgate.demo.backbone import accuracy
from timm_dgate.fashion_mnist import load_splits
from timm_dgate.flops import count_flops


def record(name: str, model: nn.Module, val: TensorDataset, test: TensorDataset, input_size: int = 32) -> dict:
    """Plain accuracy on both splits and FLOPs per image (FlopCounterMode, as the gated models)."""
    return {
        "model": name,
        "epochs": backbone_epochs(name),
        "val_accuracy": accuracy(model, val, input_size),
        "accuracy": accuracy(model, test, input_size),
        "gflops": count_flops(model, torch.zeros(1, 1, input_size, input_size)) / 1e9,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    splits = load_splits()
    RECORDS.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        start = time.perf_counter()
        model = load_backbone(name, splits.train, args.root)
        print(f"{name}: ready in {time.perf_counter() - start:.0f}s", flush=True)
        entry = record(name, model, splits.val, splits.test)
        (RECORDS / f"{name}.json").write_text(json.dumps(entry, indent=1))
        print(f"  {entry}", flush=True)


if __name__ == "__main__":
    main()
