"""What more than one benchmark script needs: the backbones, the methods compared, the machine.

Why one module: the scripts run one after another on each other's files (``backbones.py``
trains and records, ``quality/compare.py`` fits and calibrates, ``speed/speed.py`` times,
``report.py`` writes the document), so they must agree on where the backbones live, how long
each was trained, which methods are compared and what their profiles are called. Scripts in
every folder import from here (``benchmarks.common``) and from ``benchmarks.earlyon_adapter``,
never from each other.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from timm_dgate import GatedModel, cache_features, calibrate, wrap
from timm_dgate.core.cache import FeatureCache
from timm_dgate.core.costs import GateCosts
from timm_dgate.core.exit_table import ExitTable
from timm_dgate.core.profiles import encode_thresholds
from timm_dgate.core.scores import exit_score
from timm_dgate.demo.backbone import TrainingRecord, cached_backbone
from timm_dgate.demo.pipeline import DROPS
from timm_dgate.evaluation.timing import Run
from timm_dgate.fashion_mnist import Splits, TensorBatches, load_splits
from timm_dgate.fitting.gate_kinds import DEFAULT_GATE_KIND

# trained backbones; DGATE_BACKBONES points every script at another set (a longer schedule) at once
ROOT = Path(os.environ.get("DGATE_BACKBONES", "runs/backbones"))
RECORDS = Path("runs/bench/plain")
# the demo's recipe (one-cycle AdamW) run until validation accuracy plateaus: each backbone's training.json
# holds its validation curve, and backbones.py reports the gain over the last 3 epochs (converged: under 0.2 pt)
EPOCHS = {"resnet18": 40, "resnet50": 40, "convnext_atto": 40, "resnet10t": 40, "convnext_zepto_rms": 40}
DEFAULT_EPOCHS = 12
# gated model -> smaller static models of the same family it should beat
STATIC = {"resnet18": ["resnet10t"], "resnet50": ["resnet18", "resnet10t"], "convnext_atto": ["convnext_zepto_rms"]}

Variant = tuple[Run, Sequence[torch.Tensor]]  # what evaluation.timing.interleaved times: a callable, its batches

HINGE = "hinge d-gates (paper)"
CE_SOFTMAX = "CE gates, max-softmax (SDN)"
# method -> (gate kind of timm_dgate.fitting.gate_kinds, exit score). Methods of one kind share one wrapped model (the
# two CE scores share the CE gates); every kind shares one train, validation and test cache and the same search
METHODS = {
    HINGE: ("hinge", "margin"),
    CE_SOFTMAX: ("ce", "softmax"),
    "CE gates, entropy (BranchyNet)": ("ce", "entropy"),
    "distilled gates": ("distill", "softmax"),
    "distilled + label gates": ("distill-labels", "softmax"),
    "MLP gates (CE)": ("mlp", "softmax"),
    "survivor-weighted CE gates": ("survivors", "softmax"),
}
# the method of the recipe's default gate kind (timm_dgate.fitting.gate_kinds.DEFAULT_GATE_KIND)
DEFAULT_METHOD = next(m for m, (kind, _) in METHODS.items() if kind == DEFAULT_GATE_KIND)


def backbone_epochs(name: str, root: Path = ROOT) -> int:
    """Training epochs of backbone ``name``: recorded next to every number measured on it.

    The trained backbone's own record wins over ``EPOCHS`` (a run with ``--epochs`` differs).
    """
    record = TrainingRecord.load(backbone_folder(name, root))
    return record.epochs if record else EPOCHS.get(name, DEFAULT_EPOCHS)


def backbone_folder(name: str, root: Path = ROOT) -> Path:
    """Where backbone ``name`` is cached in timm's layout (``local-dir:`` loads it from there)."""
    return root / name


def load_backbone(
    name: str, splits: Splits, root: Path = ROOT, epochs: int | None = None, device: str = "cpu"
) -> nn.Module:
    """The cached trained ``name``, in eval mode; trained now on ``device`` if missing (``epochs`` or ``EPOCHS``)."""
    epochs = epochs or EPOCHS.get(name, DEFAULT_EPOCHS)
    folder = backbone_folder(name, root)
    return cached_backbone(name, splits.train, folder, epochs=epochs, val=splits.val, device=device).eval()


def load_trained(name: str, root: Path = ROOT) -> nn.Module:
    """The trained ``name`` through timm's own ``local-dir:`` loader, in eval mode; never trains.

    For the scripts that must not pay for training (a child process, a timing run): the
    backbone has to be there already, from ``backbones.py`` or ``compare.py``.
    """
    return timm.create_model(f"local-dir:{backbone_folder(name, root)}", pretrained=True).eval()


def machine() -> str:
    """CPU model, core count and load: wall-clock numbers mean little without them."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{cpu}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}, load average {load}"


def random_gated(name: str, input_size: Sequence[int], device: torch.device | str = "cpu", num_classes: int = 10,
                 **model_kwargs: object) -> tuple[nn.Module, GatedModel]:
    """A random-init timm model and a gated copy of it with random gate weights (both in eval mode, on ``device``).

    For the speed benchmarks: an executor's speed depends on where samples exit, not on what the weights
    learned. Wrapped on the CPU, where the FLOPs are counted (``costs``), then moved.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes, in_chans=input_size[0], **model_kwargs).eval()
    gated = wrap(copy.deepcopy(model), input_size=tuple(input_size))
    for gate in gated.gates:
        torch.nn.init.normal_(gate.fc.weight, std=0.1)
    _ = gated.costs  # counted now, on the CPU
    return model.to(device), gated.to(device)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over repeats of ``a[r] / b[r]`` (seconds from ``interleaved``): each ratio compares runs taken
    moments apart, so load from elsewhere cancels out."""
    return statistics.median(x / y for x, y in zip(a, b))


def profile_name(score: str, target: str) -> str:
    """Name of the profile calibrated for exit ``score`` at ``target`` (a key of ``DROPS``).

    ``compare.py`` saves the gated models with these profiles; ``speed.py`` times them by name.
    """
    return f"{score} {target}"


@dataclass
class Point:
    """One threshold set: chosen on validation, scored on test (accuracies are fractions)."""

    target: str
    thresholds: list[float]
    val_accuracy: float
    val_gflops: float
    accuracy: float
    gflops: float
    exit_fractions: list[float]

    def to_dict(self) -> dict:
        """JSON-ready: infinite thresholds (closed gates) become strings, as in every saved profile."""
        return {**asdict(self), "thresholds": encode_thresholds(self.thresholds)}


def fixed_points(model: GatedModel, score: str, val: FeatureCache, test: ExitTable) -> list[Point]:
    """Profiles at every target of ``DROPS`` (drops from the plain model's validation accuracy), stored on ``model``.

    Thresholds are chosen on the validation cache; the test table only scores them. Scoring a
    threshold set on the test cache is exactly what the early-exit forward computes (same gate
    weights on the same pooled features); ``compare.py`` checks that claim with the real forward.
    """
    points = []
    for label, drop in DROPS.items():
        name = profile_name(score, label)
        profile = calibrate(model, val, max_drop=drop, exit_score=score, name=name, activate=False)
        accuracy, gflops, fractions = test.evaluate(profile.thresholds)
        points.append(
            Point(
                label, list(profile.thresholds), profile.val_accuracy, profile.val_gflops,
                accuracy, gflops, fractions.tolist(),
            )
        )
    return points


@torch.inference_mode()
def half_exit_thresholds(gated: GatedModel, images: torch.Tensor) -> tuple[float, ...]:
    """Gate 0 at the midpoint of its two middle scores (exactly half leave there); later gates closed."""
    margins, _ = gated.forward_gates(images)
    scores = exit_score(margins[0], gated.exit_score).sort().values
    half = len(scores) // 2
    threshold = float((scores[half - 1] + scores[half]) / 2)
    return (threshold,) + (math.inf,) * (gated.num_gates - 1)


CACHE_SPLITS = {"train": "train", "val": "validation", "test": "test"}
CACHE_DIR = Path("runs/caches")


def split_caches(
    name: str, backbones: Path, cache_dir: Path, input_size: int
) -> tuple[dict[str, FeatureCache], GateCosts]:
    """Train / validation / test caches of the backbone and its linear gates' costs (made once, then reloaded).

    Benchmarks that only fit and calibrate gates share them (``ztw.py``, ``guarantee.py``).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: cache_dir / f"{name}_{key}.safetensors" for key in CACHE_SPLITS}
    costs_path = cache_dir / f"{name}_costs.json"
    if not costs_path.exists() or not all(p.exists() for p in paths.values()):
        model = wrap(load_trained(name, backbones), input_size=(1, input_size, input_size))
        splits = load_splits()
        for key, split in CACHE_SPLITS.items():
            if not paths[key].exists():
                start = time.perf_counter()
                loader = TensorBatches(getattr(splits, key), input_size)
                cache_features(model, loader, split=split, progress=False).save(paths[key])
                print(f"  cached {key} in {time.perf_counter() - start:.0f}s", flush=True)
        costs = model.costs
        costs_path.write_text(json.dumps({"to_gate": costs.to_gate, "gate": costs.gate, "backbone": costs.backbone}))
    costs = GateCosts(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(costs_path.read_text()).items()}
    )
    return {key: FeatureCache.load(path) for key, path in paths.items()}, costs
