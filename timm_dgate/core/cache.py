"""Feature caches: one backbone pass stores what gate training and calibration need.

The backbone is frozen and each gate is linear on pooled features, so the pooled input of
every gate, the backbone's own logits and the labels are all that later steps read. Gate
training then runs many epochs in seconds, and calibration searches thresholds on tensors.
Beyond ``max_memory_bytes`` the cache is written to disk and memory-mapped, so its
resident size stays bounded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..progress import progress_bar
from .provenance import image_fingerprints

DEFAULT_MAX_MEMORY = 4 * 2**30


@dataclass
class FeatureCache:
    """Per gate ``(N, C_k)`` pooled features, ``(N, num_classes)`` backbone logits, ``(N,)`` labels.

    ``split`` names the data it came from; calibration refuses a cache of the ``test`` split.
    ``fingerprints`` ``(N,)`` identify the images themselves (``timm_dgate.core.provenance``), so that
    calibration also refuses images the gates were fit on or tested on, whatever the name.
    """

    features: list[torch.Tensor]
    logits: torch.Tensor
    labels: torch.Tensor
    split: str = "train"
    fingerprints: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self, size: int = 65536) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Row slices of the features and labels, to bound the memory a pass over the cache needs."""
        for start in range(0, len(self), size):
            stop = start + size
            yield [f[start:stop] for f in self.features], self.labels[start:stop]

    @torch.no_grad()
    def margins(self, gates: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
        """Every gate's margins for every cached sample (the layers after pooling, in float32 on the CPU)."""
        out = []
        for gate, feats in zip(gates, self.features):
            layers = copy.deepcopy(gate.layers()).cpu().float()
            out.append(torch.cat([layers(rows.float()) for rows in feats.split(65536)]))
        return out

    def save(self, path: str | Path) -> None:
        """Write the cache as one safetensors file (reloaded by :meth:`load`)."""
        tensors = {f"features.{k}": f.contiguous() for k, f in enumerate(self.features)}
        tensors |= {"logits": self.logits.contiguous(), "labels": self.labels.contiguous()}
        if self.fingerprints is not None:
            tensors["fingerprints"] = self.fingerprints.contiguous()
        save_file(tensors, str(path), metadata={"split": self.split, "num_gates": str(len(self.features))})

    @classmethod
    def load(cls, path: str | Path) -> FeatureCache:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
        tensors = load_file(str(path))
        features = [tensors[f"features.{k}"] for k in range(int(meta["num_gates"]))]
        return cls(features, tensors["logits"], tensors["labels"], meta["split"], tensors.get("fingerprints"))


class _Column:
    """Rows appended batch by batch; kept in memory, or in a memory-mapped file past a size."""

    def __init__(self, spill_dir: Path | None):
        self.parts: list[torch.Tensor] = []
        self.spill_dir = spill_dir
        self.file = None
        self.path: Path | None = None
        self.rows = 0
        self.row_shape: tuple[int, ...] = ()
        self.dtype = torch.float32

    def append(self, values: torch.Tensor) -> None:
        values = values.detach().cpu().contiguous()
        self.row_shape, self.dtype = tuple(values.shape[1:]), values.dtype
        self.rows += len(values)
        if self.file is not None:
            self.file.write(values.numpy().tobytes())
        else:
            self.parts.append(values)

    def spill(self) -> None:
        """Move what is held so far to disk; later rows go straight there."""
        if self.file is not None:
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=self.spill_dir, suffix=".bin")
        self.path = Path(name)
        self.file = open(handle, "wb")  # noqa: SIM115 - closed in finish()
        for part in self.parts:
            self.file.write(part.numpy().tobytes())
        self.parts = []

    def finish(self) -> torch.Tensor:
        if self.file is None:
            return torch.cat(self.parts) if self.parts else torch.empty((0, *self.row_shape), dtype=self.dtype)
        self.file.close()
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        array = np.memmap(self.path, dtype=np_dtype, mode="r", shape=(self.rows, *self.row_shape))
        return torch.from_numpy(np.asarray(array))


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Class indices in ``[0, num_classes)``: anything else would silently score against the wrong class."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise ValueError(f"label {bad} is outside [0, {num_classes}): the model has num_classes={num_classes}")


@torch.no_grad()  # not inference_mode: cached tensors feed autograd when gates train
def cache_features(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    split: str = "train",
    max_memory_bytes: int = DEFAULT_MAX_MEMORY,
    spill_dir: str | Path | None = None,
    progress: bool = True,
) -> FeatureCache:
    """One pass of ``model.forward_pooled`` over ``loader`` (batches of ``(images, labels)``)."""
    spill_path = Path(spill_dir) if spill_dir else Path(tempfile.gettempdir()) / "timm_dgate_cache"
    columns: list[_Column] | None = None
    held = 0
    device = next(model.parameters()).device
    for images, labels in progress_bar(loader, f"caching {split} features", enabled=progress):
        labels = torch.as_tensor(labels)
        check_labels(labels, model.num_classes)
        pooled, logits = model.forward_pooled(images.to(device, _param_dtype(model)))
        values = [*(p.float() for p in pooled), logits.float(), labels, image_fingerprints(images)]
        if columns is None:
            columns = [_Column(spill_path) for _ in values]
        for column, value in zip(columns, values):
            column.append(value)
        held += sum(v.numel() * v.element_size() for v in values)
        if held > max_memory_bytes:
            for column in columns:
                column.spill()
    if columns is None:
        raise ValueError(f"the {split} data is empty: nothing to cache")
    *features, logits, labels, fingerprints = [c.finish() for c in columns]
    return FeatureCache(features, logits, labels.long(), split, fingerprints)


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    """Images go in at the model's dtype (a bf16 model takes bf16 input); cached features are float32."""
    return next(model.parameters()).dtype


def cache_key(**parts: object) -> str:
    """A short stable name for a cache file from what determines its contents."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]

