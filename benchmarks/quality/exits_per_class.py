"""Where each Fashion-MNIST class leaves a gated backbone: the paper's Experiment 4, on a trained timm model.

Why: Shafiee et al. (2019), Experiment 4, counted which ImageNet classes each d-gate of a
ResNet-101 decides, and found the highly distinguishable classes decided at the early gates and
the others passed on to deeper layers. This redoes it on a backbone trained here, for each gate
kind asked for (``hinge``: the paper's gates with the margin score; ``mlp``: the recipe's
default, softmax score; ``METHODS`` in ``common.py`` maps a kind to its score): the gated model
``compare.py`` saved, at one of its named profiles, run with the real early-exit forward. Per
class: the share of its images leaving at each gate and at the head, its accuracy, and its
average GFLOPs (the open gates included). One figure (a panel per kind) and one markdown
section (a table per kind, and a sentence saying which classes leave earliest and latest).

The thresholds are the profile's, chosen by ``compare.py`` on the 5,000-image validation split
carved from train; every number here is on the 10,000-image test split, which chose nothing.

    .venv/bin/python benchmarks/quality/exits_per_class.py --results runs/bench25 --model resnet18 \\
        --kinds hinge mlp --target iso --out-image docs/img/exits_per_class_resnet18.png --output exp4.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `benchmarks.*`

import timm_dgate
from benchmarks.common import METHODS, profile_name
from timm_dgate import GatedModel, evaluate
from timm_dgate.demo.pipeline import DROPS
from timm_dgate.evaluation.plots import plot_exits_per_class
from timm_dgate.evaluation.results import ProfileResult
from timm_dgate.fashion_mnist import CLASSES, TensorBatches, load_splits


@dataclass
class KindExits:
    """One gate kind's profile on the test split, with what it costs to leave at each exit."""

    kind: str
    method: str  # the method's name in ``METHODS``
    exit_names: list[str]  # gates, then "head"
    result: ProfileResult
    exit_gflops: list[float]  # cost of leaving at each exit, open gates passed included
    plain_accuracy: float  # the backbone alone, on the same images

    def shares(self, c: int) -> list[float]:
        """Fraction of class ``c``'s images leaving at each exit."""
        column = [row[c] for row in self.result.exits_per_class]
        return [v / max(1, sum(column)) for v in column]

    def accuracy(self, c: int) -> float:
        """Test accuracy on class ``c``'s images."""
        images = sum(row[c] for row in self.result.exits_per_class)
        return sum(row[c] for row in self.result.correct_per_class) / max(1, images)

    def gflops(self, c: int) -> float:
        """Average GFLOPs spent on an image of class ``c``."""
        return sum(s * g for s, g in zip(self.shares(c), self.exit_gflops))


def method_of(kind: str) -> tuple[str, str]:
    """The first method of ``METHODS`` with gate kind ``kind``, and its exit score."""
    for method, (k, score) in METHODS.items():
        if k == kind:
            return method, score
    raise SystemExit(f"unknown gate kind {kind!r}; METHODS in common.py has: "
                     + ", ".join(sorted({k for k, _ in METHODS.values()})))


def measure(folder: Path, kind: str, target: str, test: TensorBatches) -> KindExits:
    """Load ``<folder>``'s gated model, switch to the kind's profile at ``target`` and run it over ``test``."""
    method, score = method_of(kind)
    model = timm_dgate.from_pretrained(folder)
    if not isinstance(model, GatedModel):
        raise SystemExit(f"{folder} holds a cascade, not one gated model")
    name = profile_name(score, target)
    profile = model.use_profile(name)
    # timing is not what this measures: one batch, once
    report = evaluate(model, test, [name], split="test", timing_images=1, repeats=1, progress=False)
    costs = model.costs.exit_costs([t != math.inf for t in profile.thresholds])
    exit_names = [b.name for b in model.boundaries] + ["head"]
    return KindExits(kind, method, exit_names, report.profiles[0], (costs / 1e9).tolist(), report.plain_accuracy)


def table(exits: KindExits, classes: Sequence[str]) -> str:
    """Markdown: per class, the share leaving at each exit, its accuracy and its average GFLOPs."""
    lines = ["| class | " + " | ".join(exits.exit_names) + " | accuracy | GFLOPs |",
             "|---" + "|---:" * (len(exits.exit_names) + 2) + "|"]
    for c, name in enumerate(classes):
        cells = [f"{100 * s:.1f}%" for s in exits.shares(c)]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {100 * exits.accuracy(c):.1f}% | {exits.gflops(c):.4f} |")
    overall = [f"{100 * f:.1f}%" for f in exits.result.exit_fractions]
    lines.append("| **all** | " + " | ".join(overall)
                 + f" | {100 * exits.result.accuracy:.2f}% | {exits.result.gflops:.4f} |")
    return "\n".join(lines)


def ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 0, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            out[k] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Rank correlation of ``a`` and ``b`` (nan when either is constant)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else math.nan


def finding(exits: KindExits, classes: Sequence[str], n: int = 3) -> str:
    """One sentence from the data: the classes that leave earliest and latest, and whether easy ones leave early."""
    gflops = [exits.gflops(c) for c in range(len(classes))]
    accuracy = [exits.accuracy(c) for c in range(len(classes))]
    order = sorted(range(len(classes)), key=lambda c: gflops[c])
    early, late = order[:n], order[-n:][::-1]

    def names(group: list[int]) -> str:
        return ", ".join(f"{classes[c]} ({gflops[c]:.4f} GFLOPs, {100 * exits.shares(c)[0]:.0f}% at "
                         f"{exits.exit_names[0]})" for c in group)

    rho = spearman(accuracy, gflops)
    if rho <= -0.5:
        verdict = "the classes the model gets right most often leave earliest, as the paper found"
    elif rho >= 0.5:
        verdict = "the classes the model gets right most often leave latest, unlike the paper's finding"
    else:
        verdict = "no clear link between how easy a class is and how early it leaves"
    return (f"With {exits.kind} gates ({exits.result.name}), the classes leaving earliest are {names(early)}, "
            f"the latest {names(late)}; the rank correlation of a class's test accuracy with its average "
            f"GFLOPs is {rho:+.2f}: {verdict}.")


def compare_check(results: Path, exits: KindExits, target: str) -> str:
    """How the real forward's test numbers compare with those ``compare.py`` scored on cached features."""
    path = results / "results.json"
    if not path.exists():
        return f"{exits.kind}: no {path} to check against"
    points = json.loads(path.read_text())["methods"].get(exits.method, {}).get("points", [])
    saved = next((p for p in points if p["target"] == target), None)
    if saved is None:
        return f"{exits.kind}: {path} has no {exits.method!r} at {target!r} to check against"
    return (f"{exits.kind}: test accuracy {100 * exits.result.accuracy:.2f}% (compare.py: "
            f"{100 * saved['accuracy']:.2f}%), {exits.result.gflops:.5f} GFLOPs (compare.py: {saved['gflops']:.5f})")


def section(model: str, epochs: int | None, target: str, measured: list[KindExits], image: str) -> str:
    """The markdown section: what was measured, the figure, a table and a sentence per kind."""
    plain = measured[0].plain_accuracy
    trained = f", trained {epochs} epochs" if epochs else ""
    out = [
        f"## Where each class exits ({model}{trained}; the paper's Experiment 4)",
        "",
        f"Profile `{target}` of each gate kind (thresholds chosen on the 5,000-image validation split, "
        f"at most {100 * DROPS[target]:g} pt below the plain model's validation accuracy); every number below "
        f"is on the 10,000-image Fashion-MNIST test split (plain model: {100 * plain:.2f}%). A row "
        "gives the share of the class's test images leaving at each gate and at the head, the class's "
        "accuracy and its average GFLOPs per image (open gates included).",
        "",
        f"![where each class exits]({image})",
    ]
    for exits in measured:
        out += ["", f"### {exits.method}: `{exits.result.name}`", "", table(exits, CLASSES), "",
                finding(exits, CLASSES)]
    return "\n".join(out) + "\n"


def main() -> None:
    """Measure each kind, write the figure, print or write the markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="a compare.py output folder (runs/bench)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--kinds", nargs="+", default=["hinge", "mlp"], help="gate kinds (METHODS in common.py)")
    parser.add_argument("--target", default="iso", choices=list(DROPS))
    parser.add_argument("--out-image", type=Path, help="default: docs/img/exits_per_class_<model>.png")
    parser.add_argument("--output", type=Path, help="markdown file (default: print)")
    args = parser.parse_args()
    image = args.out_image or Path(f"docs/img/exits_per_class_{args.model}.png")
    folder = args.results / args.model

    test = load_splits().test  # compare.py's splits: the test split is the whole official one
    measured = []
    for kind in args.kinds:
        gated = folder / f"{kind}_gated"
        input_size = json.loads((gated / "dgate_config.json").read_text())["input_size"][-1]
        exits = measure(gated, kind, args.target, TensorBatches(test, input_size))
        measured.append(exits)
        print(compare_check(folder, exits, args.target), flush=True)
    saved = folder / "results.json"
    epochs = json.loads(saved.read_text()).get("backbone_epochs") if saved.exists() else None

    image.parent.mkdir(parents=True, exist_ok=True)
    plot_exits_per_class({f"{e.method}: {e.result.name}": e.result.exits_per_class for e in measured},
                         CLASSES, measured[0].exit_names, image, split="test",
                         title=f"Where each Fashion-MNIST class leaves {args.model} (test split)")
    link = os.path.relpath(image, args.output.parent if args.output else Path.cwd())
    text = section(args.model, epochs, args.target, measured, link)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output} and {image}")
    else:
        print(f"\n{text}\nwrote {image}")


if __name__ == "__main__":
    main()
