"""Data for the recipe and the CLI, through timm's own pipeline (``create_dataset``, ``create_transform``).

Every split is read with the model's evaluation transform: gates train on cached features of
un-augmented images, and calibration and evaluation must see images as the model will.
Thresholds are chosen on a validation split only. With no validation split of its own, a
seeded fraction of the training split is held out for it, and the training data loses those
images, so no image both trains a gate and chooses a threshold.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from timm.data import create_dataset, create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..compat import TORCH_TWO_SPLIT_DATASETS, TRAIN_SPLIT_NAMES, search_split
from ..core.profiles import Profile
from ..errors import InputError

VALIDATION = "validation: "  # how a recipe profile's ``split`` starts; the rest says which images


@dataclass(frozen=True)
class DataConfig:
    """Which data set, which splits, and how to read them (the recipe's and the CLI's data flags)."""

    data_dir: str | None = None
    dataset: str = ""
    train_split: str = "train"
    val_split: str = ""
    val_fraction: float = 0.1
    test_split: str = ""
    limit: int | None = None
    batch_size: int = 128
    workers: int = 2
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise InputError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit must be positive, got {self.limit}")
        if self.batch_size < 1 or self.workers < 0:
            raise InputError("--batch-size must be positive and --workers not negative")
        if self.data_dir is not None and not Path(self.data_dir).exists():
            raise InputError(f"--data-dir {self.data_dir} does not exist")
        if self.val_split and self.val_split == self.test_split:
            raise InputError(
                "--val-split and --test-split name the same data: thresholds must not be chosen on test data"
            )
        name = self.dataset.lower()
        two_splits = name.startswith("torch/") and name.removeprefix("torch/") in TORCH_TWO_SPLIT_DATASETS
        if two_splits and self.test_split and self.val_split and self.val_split not in TRAIN_SPLIT_NAMES:
            raise InputError(
                f"{self.dataset} has only train and test splits, so --val-split would be the test data; "
                "leave --val-split out to hold out --val-fraction of train"
            )

    @classmethod
    def from_args(cls, args: Any) -> DataConfig:
        """The data fields of a parsed command line (any object with these attributes)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def data_config(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    img_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict:
    """The model's preprocessing (timm's ``resolve_data_config``) at the size asked for, recorded on the model.

    A pretrained mean/std with another channel count than the input (ImageNet's RGB values for
    a grey model) is averaged to one value per channel. The result is written into
    ``model.pretrained_cfg``, which a saved folder keeps, so later commands preprocess alike.
    """
    args = {"input_size": tuple(input_size) if input_size else None, "img_size": img_size, "mean": mean, "std": std}
    args["in_chans"] = getattr(model, "in_chans", None) or _first_conv_channels(model)
    config = resolve_data_config(args, model=model)
    channels = config["input_size"][0]
    for key in ("mean", "std"):
        if len(config[key]) != channels:
            config[key] = (sum(config[key]) / len(config[key]),) * channels
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **_transform_args(config)}
    return config


def _first_conv_channels(model: nn.Module) -> int | None:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


@dataclass
class SplitData:
    """One split, ready to load, with what identifies its contents (for cache names)."""

    name: str
    dataset: Dataset
    source: str
    identity: dict[str, Any]

    def __len__(self) -> int:
        return len(self.dataset)


class RecipeData:
    """Train, validation and test splits of one data set, each with the model's eval transform."""

    def __init__(self, spec: DataConfig, config: dict):
        self.spec = spec
        self.config = config
        self.transform = create_transform(**_transform_args(config), is_training=False)
        self.img_mode = "RGB" if config["input_size"][0] == 3 else "L"

    def _create(self, split: str) -> Dataset:
        spec = self.spec
        if _is_folder(spec.dataset):
            self._check_folder_split(split)
        try:
            dataset = create_dataset(
                spec.dataset, root=spec.data_dir, split=split, download=False,
                input_img_mode=self.img_mode, transform=self.transform,
            )
        except (AssertionError, FileNotFoundError, RuntimeError, ValueError, ImportError) as error:
            where = f"{spec.dataset or 'image folder'} at {spec.data_dir}"
            raise InputError(f"cannot read split {split!r} of {where}: {error}") from error
        if isinstance(dataset, IterableDataset):
            raise InputError(f"{spec.dataset} is a streaming data set; the recipe needs one with random access")
        if len(dataset) == 0:
            raise InputError(f"split {split!r} of {spec.data_dir} has no images")
        return dataset

    def _check_folder_split(self, split: str) -> None:
        """timm falls back to the root folder for a split it cannot find; a wrong split must not pass silently."""
        root = self.spec.data_dir
        if root is None:
            raise InputError("--data-dir is required: the folder holding the images (one sub-folder per split)")
        if not Path(root).is_dir():
            raise InputError(f"--data-dir {root} is not a folder of images")
        if split not in TRAIN_SPLIT_NAMES and os.path.samefile(search_split(root, split), root):
            raise InputError(f"split {split!r} not found under {root} (no sub-folder of that name)")

    def splits(self, need_test: bool = True) -> dict[str, SplitData]:
        """``train`` and ``validation`` (held out of train unless a split is named), and ``test`` if asked."""
        spec = self.spec
        train = self._create(spec.train_split)
        out = {}
        if spec.val_split:
            out["train"] = self._subset("train", train, torch.arange(len(train)), spec.train_split)
            out["validation"] = self._named("validation", spec.val_split)
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec.seed))
            held = max(1, round(spec.val_fraction * len(train)))
            if held >= len(train):
                raise InputError(f"split {spec.train_split!r} has {len(train)} images: too few to hold out validation")
            out["train"] = self._subset("train", train, order[held:], f"{spec.train_split!r} minus validation")
            out["validation"] = self._subset("validation", train, order[:held], self.holdout())
        if need_test and spec.test_split:
            out["test"] = self.test()
        return out

    def holdout(self) -> str | None:
        """Which part of the train split is held out for validation; None with a ``--val-split`` of its own."""
        spec = self.spec
        return None if spec.val_split else f"{spec.val_fraction:g} of {spec.train_split!r} held out (seed {spec.seed})"

    def check_same_holdout(self, profiles: Iterable[Profile]) -> None:
        """Refuse a validation hold-out of train other than the one the gates were fit without.

        Another seed or fraction would calibrate on images the gates trained on, and thresholds
        chosen there are too optimistic. Folders whose profiles do not say where they came from pass.
        """
        holdout = self.holdout()
        recorded = sorted({p.split.removeprefix(VALIDATION) for p in profiles if p.split.startswith(VALIDATION)})
        if holdout is None or not recorded or any(source.startswith(holdout) for source in recorded):
            return
        raise InputError(
            f"this folder's profiles were calibrated on {' / '.join(recorded)}, but these arguments hold out "
            f"{holdout}, which contains images the gates were fit on; pass the fit's --seed and --val-fraction, "
            "or a validation split of its own with --val-split"
        )

    def test(self) -> SplitData:
        """The held-out test split (``--test-split``), which chooses nothing."""
        if not self.spec.test_split:
            raise InputError("no --test-split given")
        return self._named("test", self.spec.test_split)

    def _named(self, name: str, split: str) -> SplitData:
        dataset = self._create(split)
        return self._subset(name, dataset, torch.arange(len(dataset)), split)

    def _subset(self, name: str, dataset: Dataset, indices: torch.Tensor, source: str) -> SplitData:
        spec = self.spec
        limit = spec.limit
        if limit is not None and limit < len(indices):
            pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(spec.seed + 1))[:limit]
            indices = indices[pick]
            source += f", a random {limit}"
        indices = indices.sort().values  # read files in order
        digest = hashlib.sha1(indices.numpy().tobytes()).hexdigest()[:16]
        data_dir = str(Path(spec.data_dir).resolve()) if spec.data_dir else None
        identity = {"dataset": spec.dataset, "data_dir": data_dir, "split": source, "of": len(dataset)}
        identity["indices"] = digest
        whole = len(indices) == len(dataset)
        return SplitData(name, dataset if whole else Subset(dataset, indices.tolist()), source, identity)

    def loader(self, split: SplitData) -> DataLoader:
        return DataLoader(
            split.dataset, batch_size=self.spec.batch_size, shuffle=False, num_workers=self.spec.workers,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )


def _is_folder(name: str) -> bool:
    prefix, sep, _ = name.partition("/")
    return not sep or prefix.lower() == "folder"


def _transform_args(config: dict) -> dict:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: config[k] for k in keys if k in config}
