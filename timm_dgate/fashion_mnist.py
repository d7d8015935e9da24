"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, held as tensors: the real data the demo, the
benchmarks and the tests run on.

The data set is small (60k + 10k 28x28 grey images), so it is kept in memory as uint8
tensors and preprocessed per batch in torch: far faster on a 2-core machine than
per-sample PIL transforms in DataLoader workers.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MEAN, STD = 0.2860, 0.3530
IMAGE_SIZE = 28  # pixels a side of every Fashion-MNIST image


def default_root() -> Path:
    """Where the ungzipped IDX files live (``$TIMM_DGATE_DATA`` or ``~/.cache/timm_dgate/data``)."""
    return Path(os.environ.get("TIMM_DGATE_DATA", Path.home() / ".cache" / "timm_dgate" / "data"))


def prepare_raw(root: Path, source: Path = DEBIAN_DIR) -> Path:
    """Ungzip the Debian package's files into ``root/FashionMNIST/raw`` for torchvision."""
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        target = raw / name
        if target.exists():
            continue
        packed = source / f"{name}.gz"
        if not packed.exists():
            raise FileNotFoundError(
                f"Fashion-MNIST file {packed} is missing: install it with "
                "`apt-get install -y dataset-fashion-mnist` (see README.md)."
            )
        with gzip.open(packed, "rb") as src, open(target.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        target.with_suffix(".part").rename(target)
    return raw


@dataclass(frozen=True)
class Splits:
    """Train / validation / test tensors; validation is carved from the training set."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


def load_splits(
    root: Path | None = None, val_size: int = 5000, seed: int = 0, limit: int | None = None
) -> Splits:
    """Load uint8 images ``(N, 1, 28, 28)`` and labels; ``limit`` takes a slice of each split."""
    from torchvision.datasets import FashionMNIST

    root = Path(root or default_root())
    prepare_raw(root)
    train = FashionMNIST(str(root), train=True, download=False)
    test = FashionMNIST(str(root), train=False, download=False)
    order = torch.randperm(len(train.targets), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    images, labels = train.data.unsqueeze(1), train.targets

    def subset(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
        return TensorDataset(x[:limit], y[:limit]) if limit else TensorDataset(x, y)

    return Splits(
        train=subset(images[train_idx], labels[train_idx]),
        val=subset(images[val_idx], labels[val_idx]),
        test=subset(test.data.unsqueeze(1), test.targets),
    )


def preprocess(images: torch.Tensor, size: int = 32, augment: bool = False) -> torch.Tensor:
    """uint8 ``(B, 1, 28, 28)`` -> normalised float ``(B, 1, size, size)``, zero-padded.

    ``augment`` adds a random 4-pixel shift and a horizontal flip (training only). Runs on the
    images' device, so a GPU run preprocesses on the GPU.
    """
    x = (images.float() / 255.0 - MEAN) / STD
    pad = (size - x.shape[-1]) // 2
    rest = size - IMAGE_SIZE - pad
    x = torch.nn.functional.pad(x, (pad, rest, pad, rest), value=-MEAN / STD)
    if augment:
        shift = 4
        x = torch.nn.functional.pad(x, (shift,) * 4, value=-MEAN / STD)
        i, j = torch.randint(0, 2 * shift + 1, (2,)).tolist()
        x = x[..., i : i + size, j : j + size]
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x[flip] = x[flip].flip(-1)
    return x.contiguous()


def timm_data_config(size: int = 32) -> dict[str, Any]:
    """The timm data config under which ``create_transform`` reads a raw image exactly as :func:`preprocess` does.

    timm's eval transform resizes the shorter side to ``floor(size / crop_pct)`` and centre-crops
    ``size``. At 28 that resize is a no-op, and the crop pads with black pixels, which normalise
    to the ``-MEAN / STD`` that ``preprocess`` pads with. ``crop_pct`` (``size / 28``) is rounded
    down to 4 decimals because ``floor`` of the exact quotient lands on 27 for some sizes.
    """
    return {
        "input_size": (1, size, size),
        "interpolation": "bilinear",
        "mean": (MEAN,),
        "std": (STD,),
        "crop_pct": math.floor(size / IMAGE_SIZE * 10_000) / 10_000,
        "crop_mode": "center",
    }


class TensorBatches:
    """Preprocessed batches of a uint8 tensor data set, in order (a minimal loader)."""

    def __init__(self, data: TensorDataset, input_size: int = 32, batch_size: int = 256):
        self.images, self.labels = data.tensors
        self.input_size, self.batch_size = input_size, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            stop = start + self.batch_size
            yield preprocess(self.images[start:stop], self.input_size), self.labels[start:stop]
