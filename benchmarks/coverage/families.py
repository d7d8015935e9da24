"""Sweep one small model per timm family through ``timm_dgate.stages`` and ``timm_dgate.wrap``.

Why: the hook engine is only worth as much as the families it really works on, and the
refusals are only useful if their reasons are clear. This sweep creates one small variant of
every ``timm.list_modules()`` family with random weights at a small input, probes every
boundary, wraps it with the default gates, and writes the outcome to
``docs/architectures.md``. Each family runs in a forked child with a time cap, so one slow or
hanging model cannot stall the sweep.

    nice -n 10 .venv/bin/python benchmarks/coverage/families.py --output docs/architectures.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import queue
import re
import sys
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import timm
import torch

import timm_dgate
from timm_dgate.boundaries.probe import default_input_size
from timm_dgate.deploy.segments import compile_problem

SMALL_WORDS = {
    "atto": 0, "femto": 1, "pico": 2, "nano": 3, "xxs": 4, "xx": 4, "xxtiny": 4, "xtiny": 5,
    "tiny": 6, "xs": 6, "t": 6, "t0": 6, "mini": 7, "small": 8, "s": 8, "s0": 7, "b0": 7, "m0": 7, "lite": 8,
}
BIG_WORDS = {
    "base": 5, "medium": 4, "m": 2, "large": 10, "l": 8, "huge": 12, "h": 10, "giant": 15, "g": 12,
    "gigantic": 20, "enormous": 20, "xl": 12, "xlarge": 12, "dist": 1, "distilled": 1, "clip": 2, "enc": 1,
}
CAUSES = [  # (pattern in the refusal reason, cause as the doc groups it, what is going on)
    ("no module outputs", "`feature_info` names no module, and no module outputs the shape it reports",
     "neither a module path ending in the name nor a module emitting its channels at its reduction was found"),
    ("does not exist", "`feature_info` names a module that does not exist",
     "the name is one that timm's feature extraction uses, not a module the classifier's forward calls"),
    ("names the whole model", "`feature_info` names the whole model", "the entry is `''`, which has no end"),
    ("no batch-first feature tensor", "a stage outputs a tuple or list with no batch-first tensor",
     "nothing in it carries the batch, so there is nothing to cut"),
    ("not a tensor, tuple or list", "a stage outputs something other than a tensor, tuple or list",
     "e.g. a dict: which entry carries the features is not knowable"),
    ("times per forward", "a boundary module runs more than once per forward", "the module is shared"),
    ("first dimension is not the batch", "a stage output is not batch-first", "tokens are packed or transposed"),
    ("-channel layout", "a stage output has no recognised feature layout",
     "`feature_info`'s `num_chs` matches no dimension of the output"),
    ("breaks the rest of the forward",
     "removing samples breaks the later forward: `forward` keeps the batch size from before every boundary",
     "the model's `forward` reads `B = x.shape[0]` before its first stage and reshapes with it after each one, "
     "so no boundary inside it can shrink the batch; tensors held from before a boundary are cut to the survivors "
     "(realign), a stored integer is not, unless the family registers a forward that reads the batch from the "
     "tensor (`register_family(..., forward=...)`, as coat, twins, deepseek_vit and qwen3_vit do)"),
    ("different logits", "samples that go on get different logits",
     "a later layer mixes samples, so the survivors' results change when others leave"),
    ("no stage boundary before its last stage", "no boundary before the last stage", "nothing to gate"),
    ("forward pass at input size", "the probe forward failed", "the model fails with hooks attached"),
]


def size_key(name: str) -> tuple[float, float, float, int]:
    """Heuristic rank of a variant's size from its name (smaller first): words, then numbers."""
    tokens = [t for t in re.split(r"[_.\-]", name.lower()) if t]
    penalty = sum(BIG_WORDS.get(t, 0) for t in tokens)
    small = min((SMALL_WORDS[t] for t in tokens if t in SMALL_WORDS), default=10)
    numbers = sum(int(n) for n in re.findall(r"\d+", name))
    return penalty, small, numbers, len(name)


def param_count(name: str) -> float:
    """Parameters of ``name`` built on the meta device (no memory, no init); inf if that fails."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
        return float(sum(p.numel() for p in model.parameters()))
    except Exception:
        return float("inf")


def pick_model(module: str, shortlist: int = 4) -> str | None:
    """The smallest variant of a family: a name-based shortlist, then the fewest parameters."""
    names = [n for n in timm.list_models(module=module) if not n.startswith("test_")]
    if not names:
        return None
    ranked = sorted(names, key=size_key)[:shortlist]
    return min(ranked, key=lambda n: (param_count(n), size_key(n)))


def create(name: str, size: int | None) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """Create ``name`` (random init, 10 classes) for ``size`` pixels, or its default size when None."""
    kwargs: dict[str, object] = {"pretrained": False, "num_classes": 10}
    if size is None:
        model = timm.create_model(name, **kwargs)
        return model.eval(), default_input_size(model)
    try:
        model = timm.create_model(name, img_size=size, **kwargs)
    except TypeError:  # the family has no img_size argument
        model = timm.create_model(name, **kwargs)
    return model.eval(), (3, size, size)


@torch.no_grad()
def runnable_model(name: str, sizes: Iterable[int | None]) -> tuple[torch.nn.Module, tuple[int, int, int], list[str]]:
    """The first (model, input size) whose plain forward works, smallest input first."""
    errors = []
    for size in sizes:
        try:
            model, input_size = create(name, size)
            model(torch.randn(2, *input_size))
            return model, input_size, errors
        except Exception as error:
            errors.append(f"{size or 'default'}: {type(error).__name__}: {str(error)[:160]}")
    raise RuntimeError("; ".join(errors))


def sweep_one(module: str, name: str | None, partial: Callable[[dict], None] = lambda row: None) -> dict[str, object]:
    """Everything the doc says about one family: the model, its boundaries, and wrap's verdict."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    row: dict[str, object] = {"family": module, "model": name}
    if row["model"] is None:
        return row | {"status": "skipped", "reason": "no model registered"}
    try:
        model, input_size, _ = runnable_model(str(row["model"]), (64, 56, 96, 112, 128, None))
    except Exception as error:
        return row | {"status": "skipped", "reason": f"plain model fails: {error}"[:400]}
    row["input"] = input_size[1]
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    try:
        found = timm_dgate.stages(model, input_size)
    except timm_dgate.UnsupportedModelError as error:
        return row | {"status": "refused", "reason": error.reason, "boundary": error.boundary, "total": 0}
    row["total"] = len(found)
    row["ok"] = sum(b.problem is None for b in found)
    row["problems"] = [(b.name, b.problem) for b in found if b.problem]
    row["passing"] = [b.name for b in found if b.problem is None]
    try:
        gated = timm_dgate.wrap(model, input_size=input_size)
        row |= {"status": "ok", "gates": [describe(b) for b in gated.boundaries]}
        partial(row | {"compiles": "not checked: the check ran past the cap"})  # the slowest step comes last
        row["compiles"] = compile_problem(gated) or "yes"
    except timm_dgate.UnsupportedModelError as error:
        row |= {"status": "refused", "reason": error.reason, "boundary": error.boundary}
    return row | {"seconds": round(time.perf_counter() - start, 1)}


def describe(b: timm_dgate.Boundary) -> str:
    """A gate as the doc lists it: name, the module found for it, the element read, realigned shortcuts."""
    notes = [b.layout or "-"]
    if b.module != b.name:
        notes.append(f"module {b.module}")
    if b.part is not None:
        notes.append(f"element {b.part}")
    if b.realign:
        notes.append("realign")
    return f"{b.name} ({', '.join(notes)})"


def _child(module: str, name: str | None, results: mp.Queue) -> None:
    try:
        results.put(("final", sweep_one(module, name, lambda row: results.put(("partial", row)))))
    except BaseException as error:
        results.put(("final", {"family": module, "model": name, "status": "skipped",
                               "reason": f"sweep crashed: {error!r}"[:300], "trace": traceback.format_exc()[-600:]}))


def run_capped(module: str, cap: float) -> dict[str, object]:
    """``sweep_one`` in a forked child, killed after ``cap`` seconds (the model is picked here, on meta)."""
    name = pick_model(module)
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_child, args=(module, name, results), daemon=True)
    deadline = time.perf_counter() + cap
    child.start()
    row = {"family": module, "model": name, "status": "skipped",
           "reason": f"no result within the {cap:.0f} s cap (one thread)"}
    while (left := deadline - time.perf_counter()) > 0:  # the last row the child sent before the cap
        try:
            stage, row = results.get(timeout=min(left, 1.0))
        except queue.Empty:
            if not child.is_alive() and results.empty():
                break
            continue
        if stage == "final":
            break
    if child.is_alive():
        child.kill()
    child.join()
    return row


def cause_of(reason: str) -> tuple[str, str]:
    """The group a refusal belongs to, and the sentence that explains it."""
    for pattern, cause, why in CAUSES:
        if pattern in reason:
            return cause, why
    return "other", reason


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, object]]) -> list[str]:
    """The per-family markdown table: a refused family lists the boundaries that would still work."""
    lines = [
        "| family | model | input | params (M) | boundaries ok/total | default gates | result | compiles |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] == "ok":
            result = "ok"
            if r.get("problems"):
                result += "; refused elsewhere: " + "; ".join(f"`{n}`: {p}" for n, p in r["problems"])
        else:
            where = f" at `{r['boundary']}`" if r.get("boundary") else ""
            result = f"**{r['status']}**{where}: {r.get('reason', '')}"
            if r.get("passing"):
                result += "; boundaries that pass: " + ", ".join(f"`{n}`" for n in r["passing"])
        ok_total = f"{r.get('ok', 0)}/{r['total']}" if "total" in r else "-"
        gates = ", ".join(f"`{g}`" for g in r.get("gates", [])) or "-"
        lines.append(
            f"| {r['family']} | {r.get('model') or '-'} | {r.get('input', '-')} | {r.get('params_m', '-')} "
            f"| {ok_total} | {gates} | {_cell(result)[:600]} | {_cell(r.get('compiles', '-'))} |"
        )
    return lines


def summary(rows: list[dict[str, object]]) -> list[str]:
    """Prose: which families work, which are refused and why (grouped by cause), which were skipped."""
    ok = [r for r in rows if r["status"] == "ok"]
    clean = [r["family"] for r in ok if not r.get("problems")]
    partial = [r["family"] for r in ok if r.get("problems")]
    refused, skipped = defaultdict(list), [r for r in rows if r["status"] == "skipped"]
    for r in rows:
        if r["status"] == "refused":
            refused[cause_of(str(r.get("reason", "")))].append(r["family"])
    tested = len(rows) - len(skipped)
    lines = [
        f"- **{len(ok)} of {tested} families** that run here wrap with the default gates; "
        f"{len(clean)} of them pass the probe at every boundary: {', '.join(clean)}.",
    ]
    if partial:
        lines.append(
            f"- {len(partial)} wrap with the default gates but have some other boundary refused "
            f"(often a stem or a head-side boundary): {', '.join(partial)}."
        )
    total_refused = sum(len(v) for v in refused.values())
    lines.append(f"- **{total_refused} families are refused** by `wrap` with the default gates"
                 + (". By cause:" if refused else "."))
    for (cause, why), families in sorted(refused.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  - {cause} ({len(families)}): {', '.join(families)}. Why: {why}.")
    if skipped:
        lines.append(f"- {len(skipped)} skipped (the plain model itself failed here, or it hit the time cap):")
        lines.extend(f"  - {r['family']} ({r.get('model') or '-'}): {_cell(r.get('reason', ''))[:200]}"
                     for r in skipped)
    return lines


def compile_summary(rows: list[dict[str, object]]) -> list[str]:
    """One line on ``gated.compile()`` over the wrapped families (the "compiles" column, by outcome)."""
    checked = [r for r in rows if "compiles" in r]
    by_outcome: dict[str, list[str]] = defaultdict(list)
    for r in checked:
        outcome = str(r["compiles"])
        key = "yes" if outcome == "yes" else outcome.split(" (")[0].split(":")[0]
        by_outcome[key].append(str(r["family"]))
    clean = len(by_outcome.pop("yes", []))
    others = "; ".join(f"{key} ({len(names)}): {', '.join(names)}" for key, names in by_outcome.items())
    return [f"- `gated.compile()` (`timm_dgate.deploy.segments.compile_problem`, the \"compiles\" column): {clean} of "
            f"{len(checked)} wrapped families compile with no graph break and no new graph for new batch sizes "
            f"and exit patterns, outputs equal to eager" + (f"; the others: {others}." if others else ".")]


def write_doc(rows: list[dict[str, object]], path: Path, meta: dict[str, object]) -> None:
    """docs/architectures.md from the rows and how they were made (command, versions, cap, duration)."""
    doc = [
        "# Which timm architectures timm_dgate can gate",
        "",
        "Generated by `benchmarks/coverage/families.py`: one small variant per timm family "
        "(`timm.list_modules()`; smallest by name, then by parameter count), random weights, 10 classes, "
        "the first input of 64, 56, 96, 112, 128 px or the model's default at which the plain model runs. "
        "`timm_dgate.stages` probes every `feature_info` boundary (drop one sample there; the others must "
        "keep the plain model's logits exactly) and `timm_dgate.wrap` is called with the default gates. "
        "A refused family can still be gated at the boundaries listed as passing "
        "(`wrap(model, gates=[...])`). Each gate is listed with its layout and, where they apply: the module "
        "found for a `feature_info` name that is no module path (by path suffix, else by output shape), the "
        "element a gate reads of a tuple or list stage output, and `realign` where a later layer takes a tensor "
        "from before the boundary, which the engine cuts to the surviving samples too.",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; timm {meta['timm']}, torch {meta['torch']}, Python {meta['python']}; "
        f"per-family cap {meta['cap']:.0f} s on one thread; sweep took {meta['seconds'] / 60:.1f} min"
        + (f" (after {meta['resumed']} families kept from a cut-short sweep)" if meta.get("resumed") else "")
        + (f"; {meta['note']}" if meta.get("note") else ""),
        "",
        "## Summary",
        "",
        *summary(rows),
        *compile_summary(rows),
        "",
        "## Per family",
        "",
        *table(rows),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(doc))


def earlier_rows(log: Path) -> dict[str, dict]:
    """Rows a cut-short sweep printed, by family, without the skipped ones (a cap or crash is worth a retry)."""
    rows = (json.loads(line) for line in log.read_text().splitlines() if line.startswith("{"))
    return {row["family"]: row for row in rows if row.get("status") != "skipped"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", help="timm module names (default: all)")
    parser.add_argument("--cap", type=float, default=150.0, help="seconds per family")
    parser.add_argument("--output", default="docs/architectures.md")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--from-json", default=None, help="only rewrite the doc from earlier raw results")
    parser.add_argument("--resume", default=None,
                        help="the printed rows of a cut-short sweep (one JSON per line): families done there are "
                             "kept, skipped ones run again")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        write_doc(saved["rows"], Path(args.output), saved["meta"])
        return
    families = args.families or sorted(timm.list_modules())
    done = earlier_rows(Path(args.resume)) if args.resume else {}
    start, rows = time.perf_counter(), []
    for module in families:
        row = done.get(module) or run_capped(module, args.cap)
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    meta = {
        "command": " ".join(["python", *sys.argv]), "cap": args.cap, "seconds": time.perf_counter() - start,
        "date": datetime.date.today().isoformat(), "timm": timm.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "resumed": len(done),
    }
    write_doc(rows, Path(args.output), meta)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
