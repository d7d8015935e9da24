"""The Fashion-MNIST demo: train a timm ResNet, gate it, calibrate, and measure on the test split.

Thresholds are chosen on a validation split carved from the training set; every number
in the final table comes from the 10,000-image test split, which chose nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import timm_dgate
from timm_dgate.calibration.calibrate import calibrate
from timm_dgate.calibration.curves import measured_tradeoff
from timm_dgate.core.cache import FeatureCache, cache_features
from timm_dgate.core.exit_table import ExitTable
from timm_dgate.core.losses import DEFAULT_EXIT_SCORE
from timm_dgate.evaluation.evaluate import evaluate
from timm_dgate.evaluation.plots import plot_exits_per_class, plot_tradeoff
from timm_dgate.evaluation.results import EvalReport, evaluation_table, exits_per_class_table
from timm_dgate.fitting.gate_kinds import DEFAULT_GATE_KIND, GATE_KINDS, fit_kind
from timm_dgate.fitting.training import DEFAULT_EPOCHS
from timm_dgate.reports import equal_flops_table, html_report

from ..fashion_mnist import CLASSES, TensorBatches, load_splits
from .backbone import cached_backbone

# profile name -> allowed drop from the plain model's validation accuracy
DROPS = {"iso": 0.001, "-0.5pt": 0.005, "-1pt": 0.01, "-2pt": 0.02}
# gate kind -> the exit scores it is calibrated with: the paper's gates, the cross-entropy baseline, and the default
DEMO_KINDS = {"hinge": ("margin",), "ce": ("softmax", "entropy")} | {
    DEFAULT_GATE_KIND: (DEFAULT_EXIT_SCORE[GATE_KINDS[DEFAULT_GATE_KIND].loss],)
}


@dataclass
class DemoConfig:
    output: str = "runs/demo"
    model: str = "resnet18"
    input_size: int = 32
    backbone_epochs: int = 4
    gate_epochs: int = DEFAULT_EPOCHS
    limit: int | None = None
    val_size: int = 5000
    seed: int = 0
    retrain: bool = False
    confidence: float | None = 0.9  # None: targets met by the validation estimate itself
    timing_images: int = 2048
    timing_repeats: int = 3


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo; print the tables and write results, plots and the Hub folder to ``cfg.output``."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(val_size=cfg.val_size, seed=cfg.seed, limit=cfg.limit)
    sizes = (len(splits.train), len(splits.val), len(splits.test))
    print("Fashion-MNIST: {} train, {} validation (from train), {} test".format(*sizes))
    backbone = cached_backbone(
        cfg.model, splits.train, out / "backbone",
        epochs=cfg.backbone_epochs, input_size=cfg.input_size, seed=cfg.seed, retrain=cfg.retrain,
    )

    input_size = (1, cfg.input_size, cfg.input_size)
    loaders = {name: TensorBatches(getattr(splits, name), cfg.input_size) for name in ("train", "val", "test")}
    gated = {kind: timm_dgate.wrap(backbone, input_size=input_size, gate_head=GATE_KINDS[kind].head,
                                   gate_head_options=GATE_KINDS[kind].head_options)
             for kind in DEMO_KINDS}
    first = gated["hinge"]
    print(f"Gates after {', '.join(b.name for b in first.boundaries)}; cost of reaching each (GFLOPs): "
          + ", ".join(f"{c / 1e9:.4f}" for c in first.costs.cumulative())
          + f"; full model {first.costs.backbone / 1e9:.4f}")
    caches: dict[str, FeatureCache] = {
        name: cache_features(first, loader, split="validation" if name == "val" else name)
        for name, loader in loaders.items()
    }
    for kind, model in gated.items():
        t0 = time.perf_counter()
        report = fit_kind(model, caches["train"], GATE_KINDS[kind], caches["val"], epochs=cfg.gate_epochs,
                          seed=cfg.seed)
        print(f"Fitted {kind} gates in {time.perf_counter() - t0:.1f}s; train accuracy per gate: "
              + ", ".join(f"{100 * a:.1f}%" for a in report.train_accuracy))
        for score in DEMO_KINDS[kind]:
            for label, drop in DROPS.items():
                calibrate(model, caches["val"], max_drop=drop, confidence=cfg.confidence, exit_score=score,
                          name=f"{kind}/{score} {label}")

    sections: list[tuple[str, str]] = []

    def section(title: str, body: str) -> None:
        sections.append((title, body))
        print(f"\n{title}:\n\n{body}")

    reports: dict[str, EvalReport] = {}
    for kind, model in gated.items():
        reports[kind] = evaluate(
            model, loaders["test"], split="test", timing_images=cfg.timing_images, repeats=cfg.timing_repeats,
            record=True,
        )
        section(f"{kind} gates on the test split ({reports[kind].num_images} images)",
                evaluation_table(reports[kind]))

    gate_names = [b.name for b in first.boundaries]
    default_iso = reports[DEFAULT_GATE_KIND].profiles[0]
    section(f"Exits per class, {default_iso.name} (share of each class's test images)",
            exits_per_class_table(default_iso, CLASSES, gate_names))

    curves = {}
    for kind, model in gated.items():
        for score in DEMO_KINDS[kind]:
            curves[f"{kind} gates ({score})"] = measured_tradeoff(
                ExitTable.from_cache(model, caches["val"], score), ExitTable.from_cache(model, caches["test"], score)
            )
    plain_point = (reports["hinge"].plain_accuracy, reports["hinge"].plain_gflops)
    section("Test accuracy at equal compute (each curve's thresholds chosen on validation)",
            equal_flops_table(curves, plain_point))
    plot_tradeoff(curves, plain_point, out / "tradeoff.png", split="test",
                  title="Fashion-MNIST test split (thresholds chosen on validation)")
    plot_exits_per_class({f"Where each class exits ({default_iso.name})": default_iso.exits_per_class},
                         CLASSES, [*gate_names, "head"], out / "exits_per_class.png", split="test")

    results = {
        "config": asdict(cfg),
        "seconds": time.perf_counter() - started,
        "gates": gate_names,
        "reports": {kind: asdict(r) for kind, r in reports.items()},
        "curves": curves,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "report.md").write_text("\n".join(f"## {title}\n\n{body}\n" for title, body in sections))
    plots = [("accuracy against cost on the test split", out / "tradeoff.png"),
             (f"where each class exits ({default_iso.name})", out / "exits_per_class.png")]
    page = html_report(f"timm_dgate demo: {cfg.model} on Fashion-MNIST", sections,
                       [(caption, path.read_bytes()) for caption, path in plots])
    (out / "report.html").write_text(page, encoding="utf-8")
    hub = gated[DEFAULT_GATE_KIND].save_pretrained(out / "hub", tradeoff_plot=out / "tradeoff.png")
    print(f"\nThe {DEFAULT_GATE_KIND}-gated model with its profiles: {hub} "
          f"(timm_dgate.from_pretrained({str(hub)!r}))")
    print(f"Numbers: {out / 'results.json'}; tables: {out / 'report.md'}; plots: {out / 'tradeoff.png'}, "
          f"{out / 'exits_per_class.png'}")
    print(f"Demo finished in {results['seconds']:.0f}s. Everything in one page: {out / 'report.html'}")
    return results
