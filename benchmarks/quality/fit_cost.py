"""Fit one kind of gates on a saved training-feature cache, in a process of its own, and report its cost.

Why a separate process: peak memory is read from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
a high-water mark of the whole process, so the fit must not share a process with the
backbone passes that came before it. The peak added by fitting is the maxrss after the fit
minus the maxrss once the backbone and the cache are loaded (tracemalloc would miss torch's
allocations, which bypass Python's allocator). Writes the fitted gates for ``compare.py``.

    .venv/bin/python benchmarks/quality/fit_cost.py --model resnet18 \
        --cache runs/bench/resnet18/train_cache.safetensors --kind hinge --out runs/bench/resnet18/hinge_gates.pt
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `benchmarks.*`

from benchmarks.common import load_trained
from timm_dgate import wrap
from timm_dgate.core.cache import FeatureCache
from timm_dgate.fitting.gate_kinds import GATE_KINDS, fit_kind
from timm_dgate.fitting.training import DEFAULT_EPOCHS


def maxrss_mib() -> float:
    """This process's peak resident memory so far (a high-water mark: it never goes down)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--kind", choices=list(GATE_KINDS), required=True)
    parser.add_argument("--val-cache", type=Path, help="validation features (kinds with survivor refits)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    kind = GATE_KINDS[args.kind]
    size = (1, args.input_size, args.input_size)
    gated = wrap(load_trained(args.model), input_size=size, gate_head=kind.head, gate_head_options=kind.head_options)
    cache = FeatureCache.load(args.cache)
    val = FeatureCache.load(args.val_cache) if args.val_cache else None
    before = maxrss_mib()
    start = time.perf_counter()
    report = fit_kind(gated, cache, kind, val, epochs=args.epochs, progress=False)
    seconds = time.perf_counter() - start
    peak = maxrss_mib()
    torch.save(gated.gates.state_dict(), args.out)
    cache_mib = sum(f.numel() * f.element_size() for f in cache.features) / 2**20
    print(json.dumps({
        "kind": args.kind, "loss": kind.loss, "epochs": args.epochs, "fit_s": seconds,
        "threads": torch.get_num_threads(),
        "maxrss_before_mib": before, "maxrss_after_mib": peak, "fit_peak_delta_mib": peak - before,
        "cache_features_mib": cache_mib, "train_accuracy": report.train_accuracy,
    }))


if __name__ == "__main__":
    main()
