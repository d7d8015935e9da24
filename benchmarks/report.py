"""Write docs/benchmarks.md, docs/benchmarks.json and the plots from what compare.py, speed.py and backbones.py saved.

Why separate: the measurements take most of an hour; the document can be rewritten in a
second. placement.py's and cascade.py's own reports in the results folder
(``benchmarks-placement.md``, ``cascade/*.md``) and exits_per_class.py's
(``exits_per_class_<model>.md``) become sections of it. Text under the heading
``## Reading the numbers`` in an existing document is kept, so the hand-written discussion
survives a regeneration.

    .venv/bin/python benchmarks/report.py --models resnet18 resnet50 convnext_atto --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks.*`

from benchmarks.common import CE_SOFTMAX, DEFAULT_METHOD, HINGE, METHODS, RECORDS, STATIC, machine
from timm_dgate.demo.pipeline import DROPS

KEEP = "## Reading the numbers"
TARGETS = {"iso": "iso (≤0.1 pt)", "-0.5pt": "−0.5 pt", "-1pt": "−1 pt", "-2pt": "−2 pt"}
EARLYON = "earlyon 0.3.0 (its heads + calibration)"


def load(path: Path) -> dict | None:
    """A saved JSON result, or None: the document covers whatever has been measured so far."""
    return json.loads(path.read_text()) if path.exists() else None


def included(report: Path, title: str, img: Path) -> list[str]:
    """Another script's markdown report as a section: its own title dropped, headings one level down, images copied.

    placement.py and cascade.py write their own reports next to their results; this puts them in
    the one benchmark document without either script knowing about it.
    """
    if not report.exists():
        return []
    lines = report.read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    out = [f"## {title}", ""]
    for line in lines:
        for link in re.findall(r"!\[[^]]*]\(([^)]+\.png)\)", line):
            picture = (report.parent / link).resolve()
            kept = img / (picture.name if picture.parent == img.resolve() else f"{report.parent.name}_{picture.name}")
            if picture != kept.resolve():
                shutil.copy(picture, kept)
            line = line.replace(f"]({link})", f"](img/{kept.name})")
        out.append(f"#{line}" if line.startswith("#") else line)
    return [*out, ""]


def status_block(document: str) -> list[str]:
    """The hand-written ``> **Status ...`` blockquote under an existing document's title (kept, like the reading)."""
    lines = document.splitlines()[1:]
    while lines and not lines[0].strip():
        lines = lines[1:]
    block = []
    for line in lines:
        if not line.startswith(">"):
            break
        block.append(line)
    return [*block, ""] if block and block[0].startswith("> **Status") else []


def ztw_section(ztws: list[dict]) -> list[str]:
    """``ztw.py``'s Zero Time Waste exits beside the library's kinds, per backbone (cell: test change / saved)."""
    out = ["## Zero Time Waste's exits (cascaded inputs, ensembles)", "",
           "`benchmarks/quality/ztw.py` on the same caches and splits: gate k reads its pooled features and the "
           "earlier gates' logits (*cascade*), or exit k decides with a learned weighted geometric mean of gates 0..k "
           "(*ensemble*), for linear CE and MLP gates; the earlier gates' cost is charged whenever a later exit "
           "needs them. Thresholds by the library's search on validation at each target; cell: test accuracy "
           "change in points / FLOPs saved. Last column: the front chosen on validation, read on test at "
           "≥ plain − 0.1 / − 0.5 pt (descriptive; – where only the plain model qualifies).", ""]
    for z in ztws:
        labels = list(next(iter(z["methods"].values()))["points"])
        out += [f"### {z['model']} (plain test accuracy {pct(z['plain']['accuracy'])})", "",
                "| exits | " + " | ".join(labels) + " | saved at test ≥ plain −0.1 / −0.5 pt |",
                "|---|" + "---|" * (len(labels) + 1)]
        for name, m in z["methods"].items():
            cells = [f"{p['delta_pt']:+.2f} / {p['flops_saved']:.1f}%" for p in m["points"].values()]
            reads = m["saved_at_test_accuracy"].values()
            curve = " / ".join("–" if not v else f"{v:.1f}%" for v in reads)
            out.append(f"| {name} | " + " | ".join(cells) + f" | {curve} |")
        out.append("")
    return out


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def method_points(result: dict) -> dict[str, dict[str, dict]]:
    """method -> target label -> {accuracy, gflops, val_accuracy}; earlyon included when run."""
    out = {name: {p["target"]: p for p in m["points"]} for name, m in result["methods"].items()}
    if "earlyon" in result:
        out[EARLYON] = {label: p for label, p in result["earlyon"].items() if label in DROPS}
    return out


def curves(result: dict) -> dict[str, list[tuple[float, float]]]:
    """method -> (test accuracy, test GFLOPs) points; earlyon's from its calibrations at every budget."""
    out = {name: [tuple(p) for p in m["curve"]] for name, m in result["methods"].items()}
    if "earlyon" in result:
        out[EARLYON] = sorted((p["accuracy"], p["gflops"]) for p in result["earlyon"].values())
    return out


def best_saving(points: list[tuple[float, float]], floor: float, base: float) -> float | None:
    """Largest FLOPs saving among curve points at or above ``floor`` test accuracy."""
    fits = [1 - g / base for a, g in points if a >= floor - 1e-12]
    return max(fits) if fits else None


def curve_table(result: dict) -> str:
    """FLOPs saved per method at equal *test* accuracy, read off the curves (descriptive, not deployable)."""
    plain, base = result["plain"]["accuracy"], result["plain"]["gflops"]
    drops = (0.001, 0.005, 0.01, 0.02)
    lines = ["| method | " + " | ".join(f"test drop ≤ {100 * d:g} pt" for d in drops) + " |",
             "|---" * (len(drops) + 1) + "|"]
    for method, points in curves(result).items():
        cells = []
        for d in drops:
            saving = best_saving(points, plain - d, base)
            cells.append("–" if saving is None else f"{100 * saving:.1f}%")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fixed_table(result: dict, statics: dict[str, dict]) -> str:
    """Each method at each validation target, and the static models as single points beside them."""
    plain = result["plain"]
    base = plain["gflops"]
    head = "| method | " + " | ".join(TARGETS.values()) + " |"
    lines = [
        f"Plain `{result['model']}`: validation {pct(plain['val_accuracy'])}, test {pct(plain['accuracy'])}, "
        f"{base:.4f} GFLOPs. Each cell: test accuracy (Δ vs plain test) · test GFLOPs · FLOPs saved; "
        "the target is a drop from the plain model's *validation* accuracy.",
        "",
        head,
        "|---" * (len(TARGETS) + 1) + "|",
    ]
    for method, points in method_points(result).items():
        cells = []
        for label in TARGETS:
            p = points[label]
            delta = 100 * (p["accuracy"] - plain["accuracy"])
            saved = 100 * (1 - p["gflops"] / base)
            cells.append(f"{pct(p['accuracy'])} ({delta:+.2f}) · {p['gflops']:.4f} · **{saved:.1f}%**")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for name, s in statics.items():
        delta = 100 * (s["accuracy"] - plain["accuracy"])
        cell = f"{pct(s['accuracy'])} ({delta:+.2f}) · {s['gflops']:.4f} · {100 * (1 - s['gflops'] / base):.1f}%"
        lines.append(f"| static `{name}` ({s['epochs']} epochs) | {cell} (one point, no target) | | | |")
    return "\n".join(lines)


def plot(result: dict, statics: dict[str, dict], path: Path) -> None:
    """Accuracy vs GFLOPs of every method, the plain and the static models in one picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for method, m in result["methods"].items():
        line = ax.plot([g for _, g in m["curve"]], [100 * a for a, _ in m["curve"]], marker=".", label=method)[0]
        ax.scatter([p["gflops"] for p in m["points"]], [100 * p["accuracy"] for p in m["points"]],
                   marker="o", facecolors="none", edgecolors=line.get_color(), s=60)
    if "earlyon" in result:
        points = sorted((p["gflops"], p["accuracy"]) for p in result["earlyon"].values())
        ax.plot([g for g, _ in points], [100 * a for _, a in points], marker="s", linestyle="--", label=EARLYON)
    plain = result["plain"]
    ax.scatter([plain["gflops"]], [100 * plain["accuracy"]], color="black", zorder=5, label=f"plain {result['model']}")
    for (name, s), color in zip(statics.items(), ("tab:purple", "tab:brown", "tab:gray")):
        ax.scatter([s["gflops"]], [100 * s["accuracy"]], marker="^", s=70, zorder=5, color=color,
                   label=f"static {name}")
    ax.set_xlabel("average GFLOPs per image (gates / heads included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{result['model']}, Fashion-MNIST test; thresholds chosen on validation\n"
                 "(lines: trade-off curves; circles: the four fixed targets)", fontsize=9)
    low = min([100 * plain["accuracy"] - 6, *(100 * s["accuracy"] - 1 for s in statics.values())])
    ax.set_ylim(bottom=max(low, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def variant_name(row: dict) -> str:
    """A timed variant's name without earlyon's batch-size-specific mode, so its rows share one table line."""
    return row["variant"].replace(" (per-sample router)", "").replace(" (batched: all-or-nothing)", "")


def speed_table(speed: dict) -> str:
    """Wall-clock per variant and batch size, with each speed-up's share of its FLOPs ideal."""
    batches = sorted({r["batch"] for r in speed["rows"]})
    variants = list(dict.fromkeys(variant_name(r) for r in speed["rows"]))
    by = {(r["batch"], variant_name(r)): r for r in speed["rows"]}
    head = "| variant | " + " | ".join(f"batch {b}: img/s · speed-up · ideal · fraction" for b in batches) + " |"
    lines = [head, "|---" * (len(batches) + 1) + "|"]
    for v in variants:
        cells = []
        for b in batches:
            r = by.get((b, v))
            if r is None:
                cells.append("–")
            elif v == "plain":
                cells.append(f"{r['images_per_s']:.0f}")
            elif v == "gates closed":
                cells.append(f"{r['images_per_s']:.0f} · overhead {100 * (1 / r['speedup'] - 1):+.1f}%")
            else:
                cells.append(f"{r['images_per_s']:.0f} · {r['speedup']:.2f}x · {r['ideal']:.2f}x · "
                             f"**{r['fraction_of_ideal']:.2f}**")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    images = ", ".join(f"batch {b}: {next(r['images'] for r in speed['rows'] if r['batch'] == b)} images"
                       for b in batches)
    loads = [x for r in speed["rows"] for x in r["load"]]
    lines += ["", f"Timed on the first test images ({images}); {speed['repeats']} repeats, variants interleaved, "
              f"medians; torch threads {speed['threads']}; 1-minute load average during the runs "
              f"{min(loads):.2f} to {max(loads):.2f}. `gates closed` runs every gate closed through the hooks "
              "(`return_exits=True`); its overhead is t(closed) / t(plain) − 1. earlyon is timed with its per-sample "
              "router at batch 1 and its batched mode (a batch exits only when every sample is confident) above."]
    return "\n".join(lines)


def fit_table(results: list[dict]) -> str:
    """What fitting each gate kind costs, in plain passes over the training set (the goal is at most 1.5)."""
    kinds = list(dict.fromkeys(k for r in results for k in r["fit"]))
    lines = [
        "| model | plain pass over train | caching pass | "
        + " | ".join(f"fit `{k}`: s · (cache + fit) / plain pass" for k in kinds)
        + " | peak RSS: process / added by the hinge fit | feature cache | earlyon head training |",
        "|---" * (len(kinds) + 6) + "|",
    ]
    for r in results:
        s, f = r["seconds"], r["fit"]
        plain_s = s["plain_pass_train"]
        eo = "–"
        if "earlyon_train_s" in r:
            final = ", ".join(f"{100 * v:.1f}%" for k, v in r["earlyon_train_accuracy"][-1].items() if k != "final")
            eo = f"{r['earlyon_train_s']:.0f} s ({r['earlyon_epochs']} epochs; its exits' train accuracy {final})"
        cells = [f"{f[k]['fit_s']:.0f} · **{(s['cache_train'] + f[k]['fit_s']) / plain_s:.2f}**" if k in f else "–"
                 for k in kinds]
        lines.append(
            f"| {r['model']} | {plain_s:.0f} s | {s['cache_train']:.0f} s | " + " | ".join(cells)
            + f" | {f['hinge']['maxrss_after_mib']:.0f} / {f['hinge']['fit_peak_delta_mib']:.0f} MiB "
            f"| {f['hinge']['cache_features_mib']:.0f} MiB | {eo} |"
        )
    return "\n".join(lines)


def saved_at(points: dict[str, dict], label: str, base: float) -> float:
    return 100 * (1 - points[label]["gflops"] / base)


def goals(results: list[dict], speeds: dict[str, dict]) -> str:
    """Every goal of the benchmark, met or not, per model: the summary a reader checks first."""
    lines = ["| goal | model | result | met? |", "|---|---|---|---|"]
    for r in results:
        base = r["plain"]["gflops"]
        pts = method_points(r)
        default, ce, hinge = pts[DEFAULT_METHOD], pts[CE_SOFTMAX], pts[HINGE]
        gaps = {label: saved_at(default, label, base) - saved_at(ce, label, base) for label in ("iso", "-0.5pt")}
        lines.append(
            f"| default ({DEFAULT_METHOD}) saves ≥5 pt more FLOPs than CE max-softmax at iso and −0.5 pt | "
            f"{r['model']} | " + ", ".join(f"{TARGETS[label]}: {gap:+.1f} pt" for label, gap in gaps.items())
            + f" | {'yes' if min(gaps.values()) >= 5 else 'no'} |")
        best = {label: max(pts, key=lambda m: saved_at(pts[m], label, base)) for label in TARGETS}
        lines.append(f"| which method saves the most (test split, validation thresholds) | {r['model']} | "
                     + "; ".join(f"{TARGETS[label]}: {m} {saved_at(pts[m], label, base):.1f}%"
                                 for label, m in best.items()) + " | – |")
        lines.append(f"| the paper's hinge gates against CE max-softmax | {r['model']} | "
                     + ", ".join(f"{TARGETS[label]}: {saved_at(hinge, label, base) - saved_at(ce, label, base):+.1f} pt"
                                 for label in TARGETS) + " | – |")
        kind = METHODS[DEFAULT_METHOD][0]
        both = (r["fit"][kind]["fit_s"] + r["seconds"]["cache_train"]) / r["seconds"]["plain_pass_train"]
        lines.append(f"| fitting the default kind ≤1.5 plain passes over train | {r['model']} | cache + fit "
                     f"{both:.2f} | {'yes' if both <= 1.5 else 'no'} |")
        speed = speeds.get(r["model"])
        if speed:
            rows = [x for x in speed["rows"] if x["variant"].startswith(DEFAULT_METHOD)]
            at256 = [x for x in rows if x["batch"] == 256]
            at1 = [x for x in rows if x["batch"] == 1]
            if at256:
                low = min(x["fraction_of_ideal"] for x in at256)
                lines.append(f"| batch 256 speed-up ≥0.85 of ideal (default kind) | {r['model']} | "
                             + ", ".join(f"{x['fraction_of_ideal']:.2f}" for x in at256) + " (iso … −2 pt) | "
                             f"{'yes' if low >= 0.85 else 'no'} |")
            if at1:
                lines.append(f"| real speed-up at batch 1 (default kind) | {r['model']} | "
                             + ", ".join(f"{x['speedup']:.2f}x" for x in at1) + " (iso … −2 pt) | "
                             f"{'yes' if all(x['speedup'] > 1 for x in at1) else 'no'} |")
    return "\n".join(lines)


def machine_readable(results: list[dict], speeds: dict[str, dict], records: dict[str, dict]) -> dict:
    """docs/benchmarks.json: per model × method × target the validation and test numbers and the speed.

    The document is generated from the same dicts, so the two cannot disagree.
    """
    out: dict = {"backbones": records, "models": {}}
    for r in results:
        base = r["plain"]["gflops"]
        speed = {(row["variant"], row["batch"]): row["images_per_s"] for row in speeds.get(r["model"], {}).get(
            "rows", [])}
        methods = {}
        for method, points in method_points(r).items():
            methods[method] = {
                label: {
                    "val_accuracy": p.get("val_accuracy"), "test_accuracy": p["accuracy"], "gflops": p["gflops"],
                    "flops_saved": 1 - p["gflops"] / base,
                    "images_per_s": {b: speed[(f"{method} {label}", b)] for b in (1, 64, 256)
                                     if (f"{method} {label}", b) in speed},
                } for label, p in points.items()
            }
        out["models"][r["model"]] = {
            "backbone_epochs": r["backbone_epochs"], "plain": r["plain"],
            "plain_images_per_s": {b: v for (name, b), v in speed.items() if name == "plain"},
            "default_method": DEFAULT_METHOD, "methods": methods,
        }
    return out


def guarantee_table(guarantees: list[dict]) -> str:
    """``guarantee.py``'s miss rates: how often a profile fell below its target on re-split test data."""
    lines = ["| model | gate kind | target | confidence asked | how the bound is checked | missed the target on test "
             "| mean FLOPs saved |", "|---|---|---|---|---|---|---|"]
    bounds = {"search": "on the images that searched (the earlier way)",
              "learn then test": "on a half that did not search"}
    for g in guarantees:
        for row in g["rows"]:
            asked = f"{row['confidence']:g}" if row["confidence"] is not None else "none (plain search)"
            how = bounds[row.get("bound", "search")] if row["confidence"] is not None else "–"
            target = f"−{row['drop_points']:g} pt" if row["drop_points"] else "iso (no drop)"
            lines.append(f"| {g['model']} | {g['kind']} | {target} | {asked} | {how} "
                         f"| {100 * row['miss_rate']:.0f}% of {g['resplits']} re-splits "
                         f"| {100 * row['mean_flops_saved']:.1f}% |")
    first = guarantees[0]
    return "\n".join([*lines, "", f"`benchmarks/quality/guarantee.py`: gates fit once on train; the validation "
                       f"and test images pooled and re-split {first['resplits']} times at random into "
                       f"{first['calibration_images']:,} for calibration and the rest for scoring. A miss: test "
                       "accuracy below the plain model's minus the allowed drop. `confidence=c` asks the target to "
                       "hold on new data with probability c, so it should miss at most about 1 − c of the time "
                       "(the test split's own noise adds misses for profiles that sit just above their target)."])


def setup_table(results: list[dict], records: dict[str, dict]) -> str:
    """The backbones (gated and static): training, convergence, plain accuracy, FLOPs, and where the exits sit."""
    lines = ["| model | training epochs · time | validation gain over the last 3 epochs | val accuracy | "
             "test accuracy | GFLOPs/image | our gates after | earlyon exits after |",
             "|---|---|---|---|---|---|---|---|"]
    gated = {r["model"]: r for r in results}
    for name, rec in records.items():
        r = gated.get(name)
        gates = ", ".join(f"`{g}`" for g in r["gates"]) if r else "(static comparator)"
        eo = ", ".join(f"`{g}`" for g in r.get("earlyon_layers", [])) if r else ""
        gain = rec.get("gain_last_3_epochs")
        converged = "–" if gain is None else f"{gain:+.2f} pt ({'converged' if rec['converged'] else 'not converged'})"
        where = f" on {rec['trained_on']}" if rec.get("trained_on") and rec["trained_on"] != "cpu" else ""
        took = f" · {rec['train_seconds'] / 60:.0f} min{where}" if rec.get("train_seconds") else ""
        lines.append(f"| `{name}` | {rec['epochs']}{took} | {converged} | {pct(rec['val_accuracy'])} | "
                     f"{pct(rec['accuracy'])} | {rec['gflops']:.4f} | {gates} | {eo or '–'} |")
    return "\n".join(lines)


@dataclass
class Saved:
    """Everything the scripts saved in one results folder that the document reads; absent files are left out."""

    results: list[dict]  # compare.py, per model
    speeds: dict[str, dict]  # speed.py, per model
    records: dict[str, dict]  # backbones.py, per gated model and its static comparators
    guarantees: list[dict]  # guarantee.py
    ztws: list[dict]  # ztw.py


def load_saved(models: list[str], folder: Path) -> Saved:
    names = list(dict.fromkeys([*models, *(s for m in models for s in STATIC.get(m, []))]))
    return Saved(
        results=[r for m in models if (r := load(folder / m / "results.json"))],
        speeds={m: s for m in models if (s := load(folder / m / "speed.json"))},
        records={n: rec for n in names if (rec := load(RECORDS / f"{n}.json"))},
        guarantees=[g for m in models if (g := load(folder / "guarantee" / f"{m}.json"))],
        ztws=[z for m in models if (z := load(folder / "ztw" / m / "ztw.json"))],
    )


def intro(status: list[str]) -> list[str]:
    """The title, the kept status block, the data and FLOPs conventions, and the methods compared."""
    return [
        "# Benchmarks: gate kinds against other early-exit methods on Fashion-MNIST",
        "",
        *status,
        "Fashion-MNIST, 1×32×32 (28×28 zero-padded, as the demo), backbones trained here with the demo's recipe "
        "(`benchmarks/backbones.py`, cached in timm's layout under `runs/backbones/<model>`). Every threshold is "
        "chosen on the 5,000-image validation split carved from train (seed 0, as the demo); every number "
        "below is on the 10,000-image test split. FLOPs: `torch.utils.flop_counter.FlopCounterMode`, 2 FLOPs per "
        "multiply-add, per image, gates and exit heads included (an open gate is paid by every sample that "
        "reaches it), for our gates and earlyon's alike; earlyon's own estimate is not used.",
        "",
        "Methods at equal backbone: **hinge d-gates** (the paper: pooled linear gates, hinge loss, exit on "
        "`max_c d_c`); **CE gates, max-softmax** (SDN-style: same gates trained with cross-entropy, exit on the "
        "max softmax probability); **CE gates, entropy** (BranchyNet-style: same CE gates, exit on low entropy) "
        "— and the gate kinds beyond them (`timm_dgate.fitting.gate_kinds`): **distilled gates** (cross-entropy "
        "against the backbone's own softmax), **distilled + label gates** (half each), **MLP gates** (one hidden "
        "layer of 128, its FLOPs counted) and **survivor-weighted CE gates** (two refits weighted on the samples "
        "that reach each gate under thresholds calibrated on validation); the default kind of the recipe is "
        f"**{DEFAULT_METHOD}**. All are calibrated by `timm_dgate.calibrate` on the same validation cache; "
        "**earlyon 0.3.0** (PyPI) "
        "on the very same trained ResNet weights loaded into its torchvision ResNet (`conv1` swapped to one "
        "channel, outputs checked equal), with its own MLP exit heads trained by its `stage2_train_exits` and its "
        "own greedy grid calibration `calibrate_thresholds` (max-softmax policy) to the same drops on the same "
        "validation split; the **plain** model; and **smaller static** timm models of the same family.",
        "",
    ]


def setup_section(saved: Saved) -> list[str]:
    return ["## Setup", "", setup_table(saved.results, saved.records), ""]


def model_section(result: dict, saved: Saved, img: Path) -> list[str]:
    """One gated backbone: its plot, fixed targets, curve reading, engine check, earlyon's estimate, wall-clock."""
    name = result["model"]
    statics = {s: saved.records[s] for s in STATIC.get(name, []) if s in saved.records}
    plot(result, statics, img / f"bench_{name}.png")
    out = [f"## {name}", "", f"![accuracy vs GFLOPs, {name}](img/bench_{name}.png)", "",
           "### Fixed targets (accuracy · GFLOPs · FLOPs saved)", "", fixed_table(result, statics), "",
           "### FLOPs saved at equal test accuracy, read off the curves", "",
           "Every curve point's thresholds were chosen on validation; this table only picks, per method, "
           "the cheapest point whose *test* accuracy is within the drop of the plain model's test accuracy "
           "(a descriptive comparison at equal accuracy, not a deployable selection rule).", "",
           curve_table(result), ""]
    check = result["engine_check"]
    out += [f"Check: on the first {check['images']} test images the real early-exit forward with the "
            f"`{check['profile']}` profile took the exit the cache-based scoring predicts for "
            f"{pct(check['same_exit'])} of images and gave the same prediction for "
            f"{pct(check['same_prediction'])}.",
            ""]
    if "earlyon" in result:
        est, costs = result["earlyon_own_estimate"], result["earlyon_costs"]
        out += [f"earlyon's own FLOPs estimate for this model: method `{est['method']}`, reliable "
                f"{est['reliable']}, fractions {est['fractions']} (our count: "
                + ", ".join(f"{c / costs['backbone']:.3f}" for c in costs["to_gate"])
                + "; its heads cost " + ", ".join(f"{g / 1e6:.3f}" for g in costs["gate"])
                + " MFLOPs each, ours " + ", ".join(f"{g / 1e3:.1f}" for g in result["costs"]["gate"])
                + " kFLOPs).", ""]
    if name in saved.speeds:
        out += ["### Wall-clock", "", speed_table(saved.speeds[name]), ""]
    return out


def studies(saved: Saved, folder: Path, img: Path) -> list[str]:
    """The other scripts' sections: guarantee.py's and ztw.py's tables, then placement.py's, cascade.py's and
    exits_per_class.py's own reports."""
    out = []
    if saved.guarantees:
        out += ["## Does a profile keep its target on new data?", "", guarantee_table(saved.guarantees), ""]
    if saved.ztws:
        out += ztw_section(saved.ztws)
    out += included(folder / "benchmarks-placement.md", "Where the gates sit: stage ends or every block", img)
    for report in sorted((folder / "cascade").glob("*.md")):
        out += included(report, f"Cascades: {report.stem}", img)
    for report in sorted(folder.glob("exits_per_class_*.md")):
        out += included(report, f"Where each class exits: {report.stem.removeprefix('exits_per_class_')}", img)
    return out


def fitting_section(results: list[dict]) -> list[str]:
    train = ", ".join(sorted({str(r["sizes"]["train"]) for r in results}))
    return ["## Cost of fitting", "", fit_table(results), "",
            f"Training data for the gates and earlyon's heads: the first {train} images of the training split. "
            "Plain pass: the plain model over those images at batch 256, right after the caching pass. "
            "Caching pass: `cache_features` over them (one backbone pass storing every gate's pooled input and "
            "the logits). Fit: `timm_dgate.fitting.gate_kinds.fit_kind` on that cache (mini-batch Adam, the "
            "library's defaults; survivor refits included), in a fresh "
            "process (`benchmarks/quality/fit_cost.py`); peak memory is "
            "`resource.getrusage(RUSAGE_SELF).ru_maxrss` after the fit minus before it (backbone and cache "
            "already loaded). tracemalloc is not used: torch's allocations bypass it.", ""]


def goals_section(saved: Saved) -> list[str]:
    return ["## Goals", "", goals(saved.results, saved.speeds), ""]


def provenance(saved: Saved, models: list[str], folder: Path, commands: list[str]) -> list[str]:
    """How these numbers were made: the commands, when the results were written, the machine, the versions."""
    commands = commands or [shlex.join([Path(sys.executable).name, *sys.argv])]
    env = next((s["machine"] for s in saved.speeds.values()), machine())
    stamps = sorted(datetime.datetime.fromtimestamp(p.stat().st_mtime).isoformat(timespec="minutes")
                    for m in models for p in (folder / m).glob("*.json"))
    return ["## How these numbers were made", "", "```", *commands, "```", "",
            f"- date: results written {stamps[0] if stamps else '?'} to {stamps[-1] if stamps else '?'} (UTC)",
            f"- machine: {env} (lscpu model, cores, threads; load average when timing started)",
            f"- torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}",
            f"- results: `{folder}/<model>/results.json` and `speed.json`, `{RECORDS}/<model>.json`",
            ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "convnext_atto"])
    parser.add_argument("--results", type=Path, default=Path("runs/bench"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--commands", nargs="*", default=[], help="the commands that produced the results")
    args = parser.parse_args(argv)
    saved = load_saved(args.models, args.results)
    img = args.out.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text() if args.out.exists() else ""
    kept = old[old.index(KEEP):] if KEEP in old else ""  # the hand-written reading, and the status block above
    parts = [
        *intro(status_block(old)),
        *setup_section(saved),
        *(line for result in saved.results for line in model_section(result, saved, img)),
        *studies(saved, args.results, img),
        *fitting_section(saved.results),
        *goals_section(saved),
        *provenance(saved, args.models, args.results, args.commands),
    ]
    args.out.write_text("\n".join(parts) + ("\n" + kept if kept else ""))
    numbers = args.out.with_suffix(".json")
    numbers.write_text(json.dumps(machine_readable(saved.results, saved.speeds, saved.records), indent=1) + "\n")
    print(f"wrote {args.out} and {numbers}")


if __name__ == "__main__":
    main()
