"""Fashion-MNIST backbones for the method comparison, trained here once and cached in timm's layout.

Why a script of its own: training is the slow part (minutes per epoch on 2 cores), is shared
by every method compared, and must happen before any timing run. Each model lands in
``runs/backbones/<model>`` through :func:`timm_dgate.demo.backbone.cached_backbone`, so a
rerun loads it instead of training again.

    .venv/bin/python benchmarks/backbones.py --models resnet18 resnet50 convnext_atto resnet10t convnext_zepto_rms
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from torch import nn
from torch.utils.data import TensorDataset

from timm_dgate.demo.backbone import cached_backbone

ROOT = Path("runs/backbones")
# short runs of the demo's recipe (a shared 2-core CPU). resnet18 is the demo's own (3 epochs; its cache may be
# copied from runs/demo/backbone); resnet50 trains ~2.5x slower, so one epoch
EPOCHS = {"resnet18": 3, "resnet50": 1}
DEFAULT_EPOCHS = 2


def backbone_folder(name: str, root: Path = ROOT) -> Path:
    return root / name


def load_backbone(name: str, train: TensorDataset, root: Path = ROOT, epochs: int | None = None) -> nn.Module:
    """The cached trained ``name`` (trained now if missing), in eval mode."""
    epochs = epochs or EPOCHS.get(name, DEFAULT_EPOCHS)
    return cached_backbone(name, train, backbone_folder(name, root), epochs=epochs).eval()


def main(argv: list[str] | None = None) -> None:
    from timm_dgate.demo.data import load_splits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    splits = load_splits()
    for name in args.models:
        start = time.perf_counter()
        load_backbone(name, splits.train, args.root)
        print(f"{name}: ready in {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
