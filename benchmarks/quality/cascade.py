"""Cascades against static and gated models on Fashion-MNIST: accuracy, GFLOPs and images/s side by side.

For a pair (default resnet10t -> resnet50; ``--pair convnext_zepto_rms convnext_atto``) it
builds: every static model of ``--statics``; every model of ``--gated`` with gates of the
default kind, fit on train; the cascade small -> big (the small head is the only exit
besides the big head); and the cascade small -> gated big. Thresholds are chosen on the
validation split carved from train, at the targets compare.py uses (``DROPS``: drops from the
big model's validation accuracy); every reported number is on the test split. Images/s at
batch 1, 64 and 256 come from ``timm_dgate.evaluation.timing.interleaved`` (all variants in one run,
round-robin, medians). It checks the goal of issue 15: at the big model's own test accuracy the
gated cascade needs at most half its FLOPs and is at least 1.8x faster at batch 256, and no
single static or gated model lies above the cascade's Pareto front.

    .venv/bin/python benchmarks/quality/cascade.py                                   # needs runs/backbones/*
    .venv/bin/python benchmarks/quality/cascade.py --pair convnext_zepto_rms convnext_atto
    .venv/bin/python benchmarks/quality/cascade.py --dry-run --limit 300 --pair resnet10t resnet18 --statics \\
        resnet10t resnet18 --gated resnet18 --batch-sizes 1 64 --out runs/bench/cascade-dry   # smoke only

``--dry-run`` uses random weights (no trained backbone needed) and is only a check that the
script runs: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `benchmarks.*`

import timm_dgate
from benchmarks.common import load_trained, machine, paired_ratio
from timm_dgate import Cascade, FeatureCache, GatedModel
from timm_dgate.calibration.curves import measured_tradeoff
from timm_dgate.core.exit_table import ExitTable
from timm_dgate.core.profiles import encode_thresholds
from timm_dgate.demo.pipeline import DROPS
from timm_dgate.evaluation.plots import plot_tradeoff
from timm_dgate.evaluation.timing import interleaved
from timm_dgate.fashion_mnist import TensorBatches, load_splits, preprocess
from timm_dgate.fitting.gate_kinds import DEFAULT_GATE_KIND, GATE_KINDS, fit_kind
from timm_dgate.fitting.training import DEFAULT_EPOCHS

# pair -> the static and gated models measured beside its cascades (issue 15's list)
PAIRS = {
    ("resnet10t", "resnet50"): {
        "statics": ["resnet10t", "resnet18", "resnet50"],
        "gated": ["resnet10t", "resnet18", "resnet50"],
    },
    ("convnext_zepto_rms", "convnext_atto"): {
        "statics": ["convnext_zepto_rms", "convnext_atto"],
        "gated": ["convnext_zepto_rms", "convnext_atto"],
    },
}
IMAGES = {1: 200, 64: 512, 256: 1024}  # images per timed pass, as speed.py
TIMED_TARGETS = ("iso", "-0.5pt")
GOAL_FLOPS, GOAL_SPEEDUP = 0.5, 1.8


def build(name: str, dry_run: bool) -> nn.Module:
    """The trained backbone (``runs/backbones``), or random weights for a dry run."""
    if dry_run:
        return timm.create_model(name, in_chans=1, num_classes=10).eval()
    return load_trained(name)


def plain_cache(cache: FeatureCache) -> FeatureCache:
    """A gated model's cache as its plain backbone's: the same logits and labels, no gate features."""
    return FeatureCache([], cache.logits, cache.labels, cache.split, cache.fingerprints)


def score(model: GatedModel | Cascade, val_data: object, val: ExitTable, test: ExitTable, allow: bool) -> dict:
    """Profiles at every target (stored on ``model``), each scored on test, and the test front chosen on validation.

    ``val_data`` is what ``calibrate`` takes: a gated model's validation cache, or a cascade's one per member.
    """
    points = []
    for label, drop in DROPS.items():
        profile = model.calibrate(val_data, max_drop=drop, name=label, activate=False, allow_chance_accuracy=allow)
        accuracy, gflops, fractions = test.evaluate(profile.thresholds)
        points.append(
            {
                "target": label,
                "thresholds": encode_thresholds(profile.thresholds),
                "val_accuracy": profile.val_accuracy,
                "val_gflops": profile.val_gflops,
                "accuracy": accuracy,
                "gflops": gflops,
                "exit_fractions": fractions.tolist(),
            }
        )
    return {"points": points, "front": measured_tradeoff(val, test)}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.replot:
        stem = "-".join(args.pair)
        write(args.out, stem, json.loads((args.out / f"{stem}.json").read_text()))
        return
    started, env = time.perf_counter(), machine()
    small, big = args.pair
    defaults = PAIRS.get((small, big), {"statics": [small, big], "gated": [big]})
    statics, gated_names = args.statics or defaults["statics"], args.gated or defaults["gated"]
    names = list(dict.fromkeys([small, big, *statics, *gated_names]))
    size = (1, args.input_size, args.input_size)
    splits = load_splits(limit=args.limit, val_size=args.val_size)
    loaders = {s: TensorBatches(getattr(splits, s), args.input_size) for s in ("train", "val", "test")}
    kind = GATE_KINDS[args.gate_kind]

    # one wrapper per model: gated where asked (its caches serve the plain model too), else no gates
    members = {n: build(n, args.dry_run) for n in names}
    wrapped = {
        n: timm_dgate.wrap(m, None if n in gated_names else [], input_size=size, gate_head=kind.head,
                           gate_head_options=kind.head_options)
        for n, m in members.items()
    }
    caches = {
        n: {
            s: timm_dgate.cache_features(w, loaders[s], split=s if s != "val" else "validation", progress=False)
            for s in loaders
        }
        for n, w in wrapped.items()
    }
    for n in gated_names:
        fit_kind(wrapped[n], caches[n]["train"], kind, caches[n]["val"], epochs=args.gate_epochs, progress=False)

    variants: dict[str, dict] = {}
    for n in statics:  # a static model: one point, its plain accuracy and cost
        plain = ExitTable.from_cache(wrapped[n], plain_cache(caches[n]["test"]))
        variants[f"static {n}"] = {"model": n, "accuracy": plain.plain_accuracy, "gflops": plain.costs.backbone / 1e9}
    for n in gated_names:
        val, test = (
            ExitTable.from_cache(wrapped[n], caches[n]["val"]),
            ExitTable.from_cache(wrapped[n], caches[n]["test"]),
        )
        variants[f"gated {n}"] = score(wrapped[n], caches[n]["val"], val, test, args.dry_run)
    # every member plain or gated (where it was gated above): small -> big, small -> gated big, gated small -> ...
    choices = {n: [False, *([True] if n in gated_names else [])] for n in (small, big)}
    cascades: dict[str, Cascade] = {}
    for small_gated in choices[small]:
        for big_gated in choices[big]:
            key = f"cascade {'gated ' * small_gated}{small} -> {'gated ' * big_gated}{big}"
            cascades[key] = Cascade(
                [member(members, wrapped, small, small_gated, size), member(members, wrapped, big, big_gated, size)]
            )
    for key, model in cascades.items():
        split_caches = {
            s: [caches[n][s] if m.num_gates else plain_cache(caches[n][s]) for n, m in zip((small, big), model.members)]
            for s in ("val", "test")
        }
        val, test = model.exit_table(split_caches["val"]), model.exit_table(split_caches["test"])
        variants[key] = score(model, split_caches["val"], val, test, args.dry_run)

    speed = time_variants(args, members, wrapped, cascades, statics, gated_names)
    out = {
        "pair": [small, big],
        "input_size": size,
        "gate_kind": args.gate_kind,
        "dry_run": args.dry_run,
        "images": {s: len(getattr(splits, s)) for s in ("train", "val", "test")},
        "variants": variants,
        "speed": speed,
        "machine": env,
        "seconds": time.perf_counter() - started,
    }
    out["goals"] = {key: goal(out, key, big) for key in cascades}
    write(args.out, f"{small}-{big}", out)


def member(
    members: dict[str, nn.Module], wrapped: dict[str, GatedModel], name: str, gated: bool, size: tuple[int, int, int]
) -> GatedModel:
    """Model ``name`` as a cascade member: its gated wrapper, or its backbone with no gates (its head the only exit)."""
    return wrapped[name] if gated else timm_dgate.wrap(members[name], [], input_size=size)


def time_variants(
    args: argparse.Namespace,
    members: dict[str, nn.Module],
    wrapped: dict[str, GatedModel],
    cascades: dict[str, Cascade],
    statics: list[str],
    gated_names: list[str],
) -> list[dict]:
    """Images/s of every static model and every profile of ``TIMED_TARGETS``, per batch size, in one interleaved run."""
    test = load_splits(limit=args.limit, val_size=args.val_size).test.tensors[0]
    rows = []
    for batch in args.batch_sizes:
        count = min(len(test), max(batch, IMAGES.get(batch, 1024)))
        batches = preprocess(test[:count], args.input_size).split(batch)
        timed = {f"static {n}": (members[n], batches) for n in statics}
        for key, model in [*((f"gated {n}", wrapped[n]) for n in gated_names), *cascades.items()]:
            for label in TIMED_TARGETS:
                timed[f"{key} {label}"] = (runner(model, label), batches)
        seconds = interleaved(timed, args.repeats)
        reference = f"static {args.pair[1]}"
        for key, values in seconds.items():
            rows.append(
                {
                    "batch": batch,
                    "images": count,
                    "variant": key,
                    "images_per_s": count / statistics.median(values),
                    "speedup_vs_big": paired_ratio(seconds[reference], values) if reference in seconds else None,
                }
            )
        print(
            f"batch {batch}: "
            + ", ".join(f"{r['variant']} {r['images_per_s']:.0f}/s" for r in rows if r["batch"] == batch),
            flush=True,
        )
    for model in [*wrapped.values(), *cascades.values()]:
        model.close_gates()
    return rows


def runner(model: GatedModel | Cascade, profile: str):
    """Forward under ``profile``, switched on every call (gated big and cascade share a member)."""

    def run(x: torch.Tensor) -> object:
        model.use_profile(profile)
        return model(x)

    return run


def goal(out: dict, key: str, big: str) -> dict:
    """Issue 15's goal on the test split for cascade ``key``: at the big model's accuracy, and the Pareto check."""
    variants = out["variants"]
    reference = variants.get(f"static {big}")
    if reference is None:
        return {"checked": False, "why": f"needs static {big}"}
    at_iso = next(p for p in variants[key]["points"] if p["target"] == "iso")
    speed = next((r for r in out["speed"] if r["batch"] == 256 and r["variant"] == f"{key} iso"), None)
    front = variants[key]["front"]
    singles = [(k, v["accuracy"], v["gflops"]) for k, v in variants.items() if k.startswith("static")]
    singles += [
        (k, p["accuracy"], p["gflops"]) for k, v in variants.items() if k.startswith("gated") for p in v["points"]
    ]
    above = [k for k, a, g in singles if not any(fa >= a and fg <= g for fa, fg in front)]
    return {
        "checked": True,
        "iso_accuracy": at_iso["accuracy"],
        "big_accuracy": reference["accuracy"],
        "flops_ratio": at_iso["gflops"] / reference["gflops"],
        "flops_met": at_iso["accuracy"] >= reference["accuracy"]
        and at_iso["gflops"] <= GOAL_FLOPS * reference["gflops"],
        "speedup_256": None if speed is None else speed["speedup_vs_big"],
        "speed_met": None if speed is None else speed["speedup_vs_big"] >= GOAL_SPEEDUP,
        "above_front": sorted(set(above)),
    }


def write(folder: Path, stem: str, out: dict) -> None:
    """JSON, a markdown section and the accuracy-vs-GFLOPs plot of every variant."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(out, indent=1, default=str))
    variants, speed = out["variants"], out["speed"]
    big = f"static {out['pair'][1]}"
    big_gflops = variants[big]["gflops"] if big in variants else None
    batches = sorted({r["batch"] for r in speed})
    rate = {(r["variant"], r["batch"]): r["images_per_s"] for r in speed}
    head = (
        "| variant | target | test accuracy | GFLOPs | FLOPs saved vs big | "
        + " | ".join(f"img/s b{b}" for b in batches)
        + " |"
    )
    lines = [head, "|" + "---|" * (5 + len(batches))]
    for key, v in variants.items():
        rows = (
            [("", v["accuracy"], v["gflops"])]
            if "points" not in v
            else [(p["target"], p["accuracy"], p["gflops"]) for p in v["points"]]
        )
        for target, accuracy, gflops in rows:
            saved = "" if big_gflops is None else f"{100 * (1 - gflops / big_gflops):.1f}%"
            name = f"{key} {target}".strip()
            speeds = " | ".join(f"{rate[(name, b)]:.0f}" if (name, b) in rate else "" for b in batches)
            lines.append(f"| {key} | {target} | {100 * accuracy:.2f}% | {gflops:.4f} | {saved} | {speeds} |")
    verdict = "Goal (issue 15), per cascade:\n\n" + "\n".join(
        f"- {key}: at iso {100 * g['iso_accuracy']:.2f}% vs big {100 * g['big_accuracy']:.2f}%, "
        f"{g['flops_ratio']:.2f}x the big model's FLOPs (met: {g['flops_met']}); speed-up at batch 256 "
        f"{g['speedup_256'] if g['speedup_256'] is None else round(g['speedup_256'], 2)} (met: {g['speed_met']}); "
        f"single models above its front: {', '.join(g['above_front']) or 'none'}."
        if g.get("checked")
        else f"- {key}: not checked: {g.get('why')}."
        for key, g in out["goals"].items()
    )
    dry = "**Dry run: random weights, numbers mean nothing.**\n\n" if out["dry_run"] else ""
    (folder / f"{stem}.md").write_text(
        f"## Cascade {out['pair'][0]} -> {out['pair'][1]}\n\n{dry}Fashion-MNIST, thresholds from validation "
        f"({out['images']['val']} images), measured on test ({out['images']['test']} images); {out['gate_kind']} "
        f"gates; {out['machine']}.\n\n"
        + "\n".join(lines)
        + f"\n\n{verdict}\n\n![accuracy against GFLOPs]({stem}.png)\n\n![accuracy against images/s]({stem}_speed.png)\n"
    )
    curves = {k: v["front"] for k, v in variants.items() if "front" in v}
    points = [(k, v["accuracy"], v["gflops"]) for k, v in variants.items() if "front" not in v]
    reference = (variants[big]["accuracy"], big_gflops) if big in variants else (0.0, 0.0)
    plot_tradeoff(
        curves,
        reference,
        folder / f"{stem}.png",
        split="test",
        profiles=points,
        title=f"{out['pair'][0]} -> {out['pair'][1]}: static, gated and cascaded",
    )
    plot_speed(out, folder / f"{stem}_speed.png")
    print(f"wrote {folder / stem}.json/.md/.png and {stem}_speed.png")


def plot_speed(out: dict, path: Path) -> None:
    """Test accuracy against images/s, one panel per batch size: every timed variant as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = {k: v["accuracy"] for k, v in out["variants"].items() if "points" not in v}
    accuracy |= {f"{k} {p['target']}": p["accuracy"] for k, v in out["variants"].items() for p in v.get("points", [])}
    batches = sorted({r["batch"] for r in out["speed"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for row in (r for r in out["speed"] if r["batch"] == batch):
            kind = row["variant"].split()[0]
            ax.scatter(row["images_per_s"], 100 * accuracy[row["variant"]], marker={"static": "s"}.get(kind, "o"))
            ax.annotate(row["variant"], (row["images_per_s"], 100 * accuracy[row["variant"]]), fontsize=6)
        ax.set(title=f"batch {batch}", xlabel="images/s (higher is better)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{out['pair'][0]} -> {out['pair'][1]}: accuracy against speed ({out['machine']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", nargs=2, default=["resnet10t", "resnet50"], metavar=("SMALL", "BIG"))
    parser.add_argument("--statics", nargs="+", default=None, help="static models to measure (default: per pair)")
    parser.add_argument("--gated", nargs="+", default=None, help="models to gate (default: per pair)")
    parser.add_argument("--gate-kind", default=DEFAULT_GATE_KIND, choices=list(GATE_KINDS))
    parser.add_argument("--gate-epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each split (smoke runs)")
    parser.add_argument("--val-size", type=int, default=5000, help="validation images carved from train")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="random weights: checks the script runs, nothing more")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cascade"))
    parser.add_argument("--replot", action="store_true", help="rewrite the report and plots from the saved JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
