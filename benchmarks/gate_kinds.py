"""Which gates exit best on a frozen backbone: every kind of ``timm_dgate.gate_kinds`` on one feature cache.

Per backbone (trained by ``backbones.py``): one caching pass over train, validation and test,
then every gate kind fit on the training cache, calibrated on validation at each target of
``DROPS`` and scored on test. Fit cost is the caching pass plus the kind's gate training,
against one plain inference pass over the training set. Writes
``runs/bench/gate_kinds/<model>.json``, which ``report.py`` reads.

    .venv/bin/python benchmarks/gate_kinds.py --models resnet18 resnet50 convnext_atto
    .venv/bin/python benchmarks/gate_kinds.py --models resnet18 --limit 2000 --kinds hinge ce distill  # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import ROOT, backbone_epochs, fixed_points, load_trained
from torch.utils.data import TensorDataset

from timm_dgate import cache_features, wrap
from timm_dgate.calibration import ExitTable, measured_tradeoff
from timm_dgate.fashion_mnist import TensorBatches, load_splits, preprocess
from timm_dgate.gate_kinds import GATE_KINDS, fit_kind
from timm_dgate.losses import DEFAULT_EXIT_SCORE
from timm_dgate.timing import per_image, time_pass

OUT = Path("runs/bench/gate_kinds")


def first(data: TensorDataset, limit: int | None) -> TensorDataset:
    images, labels = data.tensors
    return TensorDataset(images[:limit], labels[:limit]) if limit else data


def run_model(name: str, kinds: list[str], args: argparse.Namespace) -> dict:
    full = load_splits()
    splits = {key: first(getattr(full, key), args.limit) for key in ("train", "val", "test")}
    backbone = load_trained(name, args.root)
    input_size = (1, args.input_size, args.input_size)
    reference = wrap(backbone, input_size=input_size)
    start = time.perf_counter()
    caches = {key: cache_features(reference, TensorBatches(data, args.input_size), split=split, progress=False)
              for (key, data), split in zip(splits.items(), ("train", "validation", "test"))}
    cache_seconds = (time.perf_counter() - start) * len(splits["train"].tensors[1]) / sum(
        len(d.tensors[1]) for d in splits.values())
    raw = splits["train"].tensors[0].split(256)
    plain_pass = per_image([time_pass(lambda x: backbone(preprocess(x, args.input_size)), raw)], raw) * len(
        splits["train"].tensors[1])
    plain = caches["test"].logits.argmax(1).eq(caches["test"].labels).double().mean().item()
    result = {
        "model": name, "backbone_epochs": backbone_epochs(name, args.root),
        "sizes": {k: len(c) for k, c in caches.items()},
        "plain": {"accuracy": plain, "gflops": reference.costs.backbone / 1e9},
        "seconds": {"cache_train": cache_seconds, "plain_pass_train": plain_pass}, "kinds": {},
    }
    reference.unwrap()
    for label in kinds:
        kind = GATE_KINDS[label]
        torch.manual_seed(0)
        gated = wrap(backbone, input_size=input_size, gate_hidden=kind.hidden)
        start = time.perf_counter()
        fit_kind(gated, caches["train"], kind, caches["val"], epochs=args.gate_epochs, progress=False)
        fit_seconds = time.perf_counter() - start
        score = DEFAULT_EXIT_SCORE[kind.loss]
        test_table = ExitTable.from_cache(gated, caches["test"], score)
        points = fixed_points(gated, score, caches["val"], test_table)
        result["kinds"][label] = {
            "kind": {**kind.__dict__}, "score": score, "fit_s": fit_seconds,
            "fit_cost_plain_passes": (cache_seconds + fit_seconds) / plain_pass,
            "gate_gflops": [g / 1e9 for g in gated.costs.gate],
            "points": [p.to_dict() for p in points],
            "curve": measured_tradeoff(ExitTable.from_cache(gated, caches["val"], score), test_table),
        }
        saved = {p.target: 100 * (1 - p.gflops / result["plain"]["gflops"]) for p in points}
        drops = {p.target: 100 * (p.accuracy - plain) for p in points}
        print(f"  {name} {label:15s} fit {fit_seconds:6.1f}s  saved " + "  ".join(
            f"{t} {saved[t]:5.1f}% ({drops[t]:+.2f}pt)" for t in saved), flush=True)
        gated.unwrap()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "convnext_atto"])
    parser.add_argument("--kinds", nargs="+", default=list(GATE_KINDS), choices=list(GATE_KINDS))
    parser.add_argument("--limit", type=int, default=None, help="images per split (smoke runs)")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--gate-epochs", type=int, default=300)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--root", type=Path, default=ROOT, help="where the trained backbones are")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        result = run_model(name, args.kinds, args)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out / f'{name}.json'}", flush=True)


if __name__ == "__main__":
    main()
