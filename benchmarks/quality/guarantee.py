"""How often does a profile land below its accuracy target on new data? 50 random re-splits of validation/test.

``calibrate(..., confidence=0.9)`` promises that an accuracy target holds on new data with 90%
probability: half the calibration images propose thresholds, the other half tests them in
sequence (Learn then Test), so on new data the profile should miss its target at most about
10% of the time; without ``confidence`` about half the time. Beside them, the bound checked
on the very images that searched (what ``confidence`` did before Learn then Test): the search
then favours thresholds whose accuracy that sample overstates. The gates are fit once on the
training split, then the 15,000 validation and test images are pooled and re-split at random
50 times into 5,000 for calibration and 10,000 for scoring. A miss: the profile's test
accuracy is below the plain model's test accuracy minus the allowed drop. Writes
``runs/bench/guarantee/<model>.json`` (``--out``), which ``report.py`` reads from
``<results>/guarantee/``. Feature caches come from ``--cache-dir`` (made there once).

    .venv/bin/python benchmarks/quality/guarantee.py --model resnet18
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `benchmarks.*`

from benchmarks.common import CACHE_DIR, ROOT, backbone_epochs, load_trained, split_caches
from timm_dgate import FeatureCache, calibrate, wrap
from timm_dgate.calibration.goals import Target, check_met, goal_of
from timm_dgate.calibration.search import search_goal
from timm_dgate.core.exit_table import ExitTable
from timm_dgate.errors import CalibrationError
from timm_dgate.fitting.gate_kinds import DEFAULT_GATE_KIND, GATE_KINDS, fit_kind

OUT = Path("runs/bench/guarantee")


def rows(cache: FeatureCache, index: torch.Tensor, split: str) -> FeatureCache:
    """The cache restricted to ``index`` (fingerprints kept, so calibration's provenance checks still run)."""
    fingerprints = None if cache.fingerprints is None else cache.fingerprints[index]
    return FeatureCache([f[index] for f in cache.features], cache.logits[index], cache.labels[index], split,
                        fingerprints)


def pooled(a: FeatureCache, b: FeatureCache) -> FeatureCache:
    fingerprints = None if a.fingerprints is None else torch.cat([a.fingerprints, b.fingerprints])
    return FeatureCache([torch.cat(pair) for pair in zip(a.features, b.features)], torch.cat([a.logits, b.logits]),
                        torch.cat([a.labels, b.labels]), "validation", fingerprints)


def choose(gated, val: FeatureCache, table: ExitTable, drop: float, confidence: float | None, way: str) -> tuple:
    """Thresholds for one target: the library's calibration, or the bound checked on the searched data."""
    if way == "learn then test" or confidence is None:
        return calibrate(gated, val, max_drop=drop, confidence=confidence, activate=False).thresholds
    target = Target(max_drop=drop, confidence=confidence)
    goal = goal_of(table, target)
    thresholds = search_goal(table, goal, "coordinate", max_rounds=10, prices=8)
    check_met(table, thresholds, goal, target)
    return thresholds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--kind", default=DEFAULT_GATE_KIND, choices=list(GATE_KINDS))
    parser.add_argument("--drops", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="points")
    parser.add_argument("--confidences", type=float, nargs="+", default=[0.9])
    parser.add_argument("--resplits", type=int, default=50)
    parser.add_argument("--calibration-images", type=int, default=5000)
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="feature caches, made once (as ztw.py's)")
    args = parser.parse_args(argv)
    kind = GATE_KINDS[args.kind]
    gated = wrap(load_trained(args.model, args.root), input_size=(1, 32, 32), gate_head=kind.head,
                 gate_head_options=kind.head_options)
    caches, _ = split_caches(args.model, args.root, args.cache_dir, 32)
    fit_kind(gated, caches["train"], kind, caches["val"], progress=False)
    pool = pooled(caches["val"], caches["test"])
    generator = torch.Generator().manual_seed(0)
    ways = [(d, None, "search") for d in args.drops]
    ways += [(d, c, way) for d in args.drops for c in args.confidences for way in ("search", "learn then test")]
    misses = dict.fromkeys(ways, 0)
    saved = {key: [] for key in ways}
    for _ in range(args.resplits):
        order = torch.randperm(len(pool), generator=generator)
        val = rows(pool, order[: args.calibration_images], "validation")
        test = rows(pool, order[args.calibration_images :], "resplit test")
        table = ExitTable.from_cache(gated, test)
        val_table = ExitTable.from_cache(gated, val)
        for drop, confidence, way in ways:
            try:
                thresholds = choose(gated, val, val_table, drop / 100, confidence, way)
            except CalibrationError:  # no gate can open within the bound: the plain model, which never misses
                saved[(drop, confidence, way)].append(0.0)
                continue
            accuracy, gflops, _ = table.evaluate(thresholds)
            misses[(drop, confidence, way)] += accuracy < table.plain_accuracy - drop / 100
            saved[(drop, confidence, way)].append(1 - gflops * 1e9 / gated.costs.backbone)
    result = {
        "model": args.model, "kind": args.kind, "backbone_epochs": backbone_epochs(args.model, args.root),
        "resplits": args.resplits, "calibration_images": args.calibration_images,
        "rows": [{"drop_points": d, "confidence": c, "bound": way, "miss_rate": misses[(d, c, way)] / args.resplits,
                  "mean_flops_saved": sum(saved[(d, c, way)]) / max(1, len(saved[(d, c, way)]))}
                 for d, c, way in ways],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.model}.json").write_text(json.dumps(result, indent=1))
    for row in result["rows"]:
        print(f"drop {row['drop_points']:g}pt confidence {row['confidence']} ({row['bound']}): missed on test in "
              f"{100 * row['miss_rate']:.0f}% of {args.resplits} re-splits; "
              f"FLOPs saved {100 * row['mean_flops_saved']:.1f}%")


if __name__ == "__main__":
    main()
