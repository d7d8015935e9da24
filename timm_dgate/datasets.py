"""Data for the recipe and the CLI, through timm's own pipeline (``create_dataset``, ``create_transform``).

Every split is read with the model's evaluation transform: gates train on cached features of
un-augmented images, and calibration and evaluation must see images as the model will.
Thresholds are chosen on a validation split only. With no validation split of its own, a
seeded fraction of the training split is held out for it, and the training data loses those
images, so no image both trains a gate and chooses a threshold.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.data.dataset_factory import _TORCH_BASIC_DS, _TRAIN_SYNONYM, _search_split
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .errors import InputError

SPLITS = ("train", "validation", "test")


def add_data_arguments(parser: argparse.ArgumentParser, test_split: str = "") -> None:
    """The data flags, named as in timm's train.py where they overlap."""
    group = parser.add_argument_group("data (timm's create_dataset)")
    group.add_argument("--data-dir", default=None, help="root folder of the data set")
    group.add_argument(
        "--dataset", default="",
        help="timm data set name: '' (an image folder with train/, validation/ sub-folders), "
        "'torch/fashion_mnist', 'torch/cifar10', 'hfds/<name>', ... (default: image folder)",
    )
    group.add_argument("--train-split", default="train", help="split the gates train on")
    group.add_argument(
        "--val-split", default="",
        help="split that chooses thresholds; default: none, hold out --val-fraction of the train split",
    )
    group.add_argument(
        "--val-fraction", type=float, default=0.1,
        help="fraction of the train split held out for validation when there is no --val-split",
    )
    group.add_argument(
        "--test-split", default=test_split, help="held-out split the results are measured on (never tunes anything)"
    )
    group.add_argument("--limit", type=int, default=None, help="use a seeded random N images of each split")
    group.add_argument("-b", "--batch-size", type=int, default=128, help="images per backbone batch")
    group.add_argument("-j", "--workers", type=int, default=2, help="data loading processes")
    group.add_argument("--seed", type=int, default=42, help="seed of the validation hold-out, subsets and init")


def check_data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument errors argparse cannot see, reported like its own (exit code 2)."""
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be positive, got {args.limit}")
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be positive and --workers not negative")
    if args.data_dir is not None and not Path(args.data_dir).exists():
        parser.error(f"--data-dir {args.data_dir} does not exist")
    if args.val_split and args.val_split == args.test_split:
        parser.error("--val-split and --test-split name the same data: thresholds must not be chosen on test data")
    name = args.dataset.lower()
    torch_two_splits = name.startswith("torch/") and name.removeprefix("torch/") in _TORCH_BASIC_DS
    if torch_two_splits and args.test_split and args.val_split and args.val_split not in _TRAIN_SYNONYM:
        parser.error(f"{args.dataset} has only train and test splits, so --val-split would be the test data; "
                     "leave --val-split out to hold out --val-fraction of train")


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

    def __init__(self, args: argparse.Namespace, config: dict):
        self.args = args
        self.config = config
        self.transform = create_transform(**_transform_args(config), is_training=False)
        self.img_mode = "RGB" if config["input_size"][0] == 3 else "L"

    def _create(self, split: str) -> Dataset:
        args = self.args
        if _is_folder(args.dataset):
            self._check_folder_split(split)
        try:
            dataset = create_dataset(
                args.dataset, root=args.data_dir, split=split, download=False,
                input_img_mode=self.img_mode, transform=self.transform,
            )
        except (AssertionError, FileNotFoundError, RuntimeError, ValueError, ImportError) as error:
            where = f"{args.dataset or 'image folder'} at {args.data_dir}"
            raise InputError(f"cannot read split {split!r} of {where}: {error}") from error
        if isinstance(dataset, IterableDataset):
            raise InputError(f"{args.dataset} is a streaming data set; the recipe needs one with random access")
        if len(dataset) == 0:
            raise InputError(f"split {split!r} of {args.data_dir} has no images")
        return dataset

    def _check_folder_split(self, split: str) -> None:
        """timm falls back to the root folder for a split it cannot find; a wrong split must not pass silently."""
        root = self.args.data_dir
        if root is None or not Path(root).is_dir():
            raise InputError(f"--data-dir {root} is not a folder of images")
        if split not in _TRAIN_SYNONYM and os.path.samefile(_search_split(root, split), root):
            raise InputError(f"split {split!r} not found under {root} (no sub-folder of that name)")

    def splits(self, need_test: bool = True) -> dict[str, SplitData]:
        """``train`` and ``validation`` (held out of train unless a split is named), and ``test`` if asked."""
        args = self.args
        train = self._create(args.train_split)
        out = {}
        if args.val_split:
            out["train"] = self._subset("train", train, torch.arange(len(train)), args.train_split)
            out["validation"] = self._named("validation", args.val_split)
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
            held = max(1, round(args.val_fraction * len(train)))
            if held >= len(train):
                raise InputError(f"split {args.train_split!r} has {len(train)} images: too few to hold out validation")
            out["train"] = self._subset("train", train, order[held:], f"{args.train_split!r} minus validation")
            out["validation"] = self._subset("validation", train, order[:held], self.holdout())
        if need_test and args.test_split:
            out["test"] = self.test()
        return out

    def holdout(self) -> str | None:
        """Which part of the train split is held out for validation; None with a ``--val-split`` of its own."""
        args = self.args
        return None if args.val_split else f"{args.val_fraction:g} of {args.train_split!r} held out (seed {args.seed})"

    def test(self) -> SplitData:
        """The held-out test split (``--test-split``), which chooses nothing."""
        if not self.args.test_split:
            raise InputError("no --test-split given")
        return self._named("test", self.args.test_split)

    def _named(self, name: str, split: str) -> SplitData:
        dataset = self._create(split)
        return self._subset(name, dataset, torch.arange(len(dataset)), split)

    def _subset(self, name: str, dataset: Dataset, indices: torch.Tensor, source: str) -> SplitData:
        args = self.args
        limit = args.limit
        if limit is not None and limit < len(indices):
            pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(args.seed + 1))[:limit]
            indices = indices[pick]
            source += f", a random {limit}"
        indices = indices.sort().values  # read files in order
        digest = hashlib.sha1(indices.numpy().tobytes()).hexdigest()[:16]
        data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
        identity = {"dataset": args.dataset, "data_dir": data_dir, "split": source, "of": len(dataset)}
        identity["indices"] = digest
        whole = len(indices) == len(dataset)
        return SplitData(name, dataset if whole else Subset(dataset, indices.tolist()), source, identity)

    def loader(self, split: SplitData) -> DataLoader:
        return DataLoader(
            split.dataset, batch_size=self.args.batch_size, shuffle=False, num_workers=self.args.workers,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )


def _is_folder(name: str) -> bool:
    prefix, sep, _ = name.partition("/")
    return not sep or prefix.lower() == "folder"


def _transform_args(config: dict) -> dict:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: config[k] for k in keys if k in config}
