"""Wall-clock of every calibrated method against the plain model, side by side in one run.

Why separate from ``compare.py``: timing wants a quiet machine and nothing else in the
process, and it reuses what ``compare.py`` saved (the gated models as Hub folders, earlyon's
heads and policies) instead of fitting again. Variants run interleaved round-robin over the
repeats (``timm_dgate.evaluation.timing.interleaved``), medians reported; a speed-up is the median over
repeats of t(plain) / t(variant), and its ideal is the FLOPs ratio of the exits those very
images take.

    .venv/bin/python benchmarks/speed/speed.py --models resnet18 resnet50 convnext_atto
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `benchmarks.*`

import timm_dgate
from benchmarks import earlyon_adapter
from benchmarks.common import (
    DEFAULT_METHOD,
    HINGE,
    METHODS,
    STATIC,
    Variant,
    backbone_folder,
    load_trained,
    machine,
    paired_ratio,
    profile_name,
)
from timm_dgate import GatedModel
from timm_dgate.core.costs import GateCosts, count_flops
from timm_dgate.demo.pipeline import DROPS
from timm_dgate.evaluation.timing import Run, interleaved
from timm_dgate.fashion_mnist import load_splits, preprocess

IMAGES = {1: 200, 64: 512, 256: 1024}
CE_LABEL = "-0.5pt"  # the one target at which the other methods are timed too
EVERY_TARGET = (HINGE, DEFAULT_METHOD)  # the paper's gates and the default kind are timed at every target


def gated_run(model: GatedModel, profile: str | None, **kwargs: bool) -> Run:
    """Forward under ``profile`` (``None``: every gate closed, still through the engine's hooks)."""

    def run(x: torch.Tensor) -> object:
        if profile is None:
            model.close_gates()
        else:
            model.use_profile(profile)
        return model(x, **kwargs)

    return run


@torch.inference_mode()
def gated_ideal(model: GatedModel, profile: str, batches: Sequence[torch.Tensor]) -> float:
    """Backbone FLOPs over the average FLOPs of the exits ``profile`` gives these very batches."""
    model.use_profile(profile)
    exits = torch.cat([model(x, return_exits=True).exits for x in batches])
    return model.costs.backbone / model.costs.average(exits, model.thresholds)


def earlyon_setup(name: str, plain: torch.nn.Module, folder: Path, input_size: tuple) -> tuple:
    """earlyon's wrapper with the heads and the ``CE_LABEL`` policy ``compare.py`` saved, and its exits' costs."""
    saved = torch.load(folder / "earlyon.pt")
    wrapper = earlyon_adapter.build(plain, name, input_size)
    wrapper.exit_heads.load_state_dict(saved["heads"])
    wrapper.eval()
    policy = saved["policies"][CE_LABEL]
    earlyon_adapter.apply(wrapper, policy)
    return wrapper, policy, earlyon_adapter.costs(wrapper, input_size)


@torch.inference_mode()
def earlyon_ideal(wrapper: torch.nn.Module, policy: dict, costs: GateCosts, images: torch.Tensor) -> float:
    """Backbone FLOPs over the average FLOPs of earlyon's per-sample exits on ``images``."""
    logits = earlyon_adapter.collect(wrapper, [(images, torch.zeros(len(images), dtype=torch.long))])
    _, gflops, _ = earlyon_adapter.score(wrapper, logits, costs, policy)
    return costs.backbone / (gflops * 1e9)


def bench_model(name: str, args: argparse.Namespace) -> dict:
    """Every variant of one model timed at every batch size: one row per (batch, variant)."""
    folder = args.results / name
    result = json.loads((folder / "results.json").read_text())
    input_size = (1, args.input_size, args.input_size)
    plain = load_trained(name)
    gated = {kind: timm_dgate.from_pretrained(folder / f"{kind}_gated").eval()
             for kind in dict.fromkeys(kind for kind, _ in METHODS.values())}
    statics = {s: load_trained(s) for s in STATIC.get(name, []) if (backbone_folder(s) / "model.safetensors").exists()}
    wrapper = policy = eo_costs = None
    if "earlyon" in result:
        wrapper, policy, eo_costs = earlyon_setup(name, load_trained(name), folder, input_size)
    test = load_splits().test.tensors[0]
    rows = []
    for batch in args.batch_sizes:
        count = max(batch, IMAGES.get(batch, 1024) if args.images is None else args.images)
        images = preprocess(test[:count], args.input_size)
        batches = images.split(batch)
        closed = gated_run(gated["hinge"], None, return_exits=True)  # the engine with nothing to do: its overhead
        timed: dict[str, Variant] = {"plain": (plain, batches), "gates closed": (closed, batches)}
        ideal = {"plain": 1.0, "gates closed": 1.0}
        for method, (kind, score) in METHODS.items():
            for label in DROPS if method in EVERY_TARGET else [CE_LABEL]:
                key, profile = f"{method} {label}", profile_name(score, label)
                timed[key] = (gated_run(gated[kind], profile), batches)
                ideal[key] = gated_ideal(gated[kind], profile, batches)
        if wrapper is not None:
            key = f"earlyon {CE_LABEL}" + (" (per-sample router)" if batch == 1 else " (batched: all-or-nothing)")
            timed[key] = (earlyon_adapter.runner(wrapper, batched=batch > 1), batches)
            ideal[key] = earlyon_ideal(wrapper, policy, eo_costs, images)
        for small, model in statics.items():
            timed[f"static {small}"] = (model, batches)
            ideal[f"static {small}"] = result["plain"]["gflops"] * 1e9 / count_flops(model, images[:1])
        load_before = os.getloadavg()[0]
        seconds = interleaved(timed, args.repeats)
        for key in timed:
            speedup = paired_ratio(seconds["plain"], seconds[key])
            rows.append({
                "batch": batch, "images": count, "variant": key,
                "images_per_s": count / statistics.median(seconds[key]), "speedup": speedup,
                "ideal": ideal[key], "fraction_of_ideal": speedup / ideal[key],
                "load": [load_before, os.getloadavg()[0]],
            })
        print(f"{name} batch {batch}: " + ", ".join(f"{r['variant']} {r['speedup']:.2f}x/{r['ideal']:.2f}x"
                                                  for r in rows if r["batch"] == batch), flush=True)
    for model in gated.values():
        model.close_gates()
    return {"model": name, "rows": rows, "repeats": args.repeats, "threads": torch.get_num_threads()}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "convnext_atto"])
    parser.add_argument("--results", type=Path, default=Path("runs/bench"), help="compare.py's output folder")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--images", type=int, default=None, help=f"images per timed pass (default {IMAGES})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep-other-batches", action="store_true",
                        help="keep saved rows of batch sizes not measured now (rerun one size after a noisy run)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    started, env = time.perf_counter(), machine()
    for name in args.models:
        out = bench_model(name, args)
        saved = args.results / name / "speed.json"
        if args.keep_other_batches and saved.exists():
            old = json.loads(saved.read_text())["rows"]
            out["rows"] = [r for r in old if r["batch"] not in args.batch_sizes] + out["rows"]
        out["machine"] = env
        out["seconds"] = time.perf_counter() - started
        (args.results / name / "speed.json").write_text(json.dumps(out, indent=1))
    print(f"speed.py finished in {time.perf_counter() - started:.0f}s; load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
