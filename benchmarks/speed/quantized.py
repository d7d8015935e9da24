"""Int8 quantization and early exit together: plain and gated, float and int8 ONNX, side by side (issue 29).

Why: int8 is the first thing many users try to make a model cheaper, so the question is whether
gates still pay on top of it. For each backbone this builds, on the CPU with onnxruntime:

- ``plain fp32``: the whole model as one ONNX file; ``plain int8``: that file quantized the way
  ``export(..., quantize="int8")`` quantizes a segment (``timm_dgate.deploy.quantize.quantize_file``:
  QDQ, per-channel int8 weights, uint8 activations, ranges from the first 512 validation images);
- ``gated fp32``: ``export`` + ``OnnxGatedModel``, thresholds calibrated on the float model;
- ``gated int8``: ``export(..., quantize="int8")``, thresholds calibrated on the int8 runtime itself
  (``timm_dgate.calibrate(runtime, val, ...)``), once per gate choice of ``--quantize-gates``
  (gates quantized, or kept in float); and the float model's thresholds run on the int8 runtime
  (accuracy and GFLOPs only), which is what recalibrating buys.

Gates are of the default kind, fit on the training split; thresholds target ``--drop`` points
below each model's own plain validation accuracy (the float one for gated fp32, the int8 one for
gated int8); every reported number is on the test split. Images/s at each batch size come from
``timm_dgate.evaluation.timing.interleaved`` (all timed variants in one run, round-robin, medians).
It checks the goal of issue 29: on resnet50 at batch 64, gated int8 at least 2.5x plain int8 at no
more than 0.5 point below its test accuracy.

    .venv/bin/python benchmarks/speed/quantized.py --models resnet18 resnet50 convnext_atto   # runs/backbones/*
    .venv/bin/python benchmarks/speed/quantized.py --models resnet18 --train-epochs 2 --train-limit 12000 \\
        --gate-images 12000   # a stand-in backbone trained here first (not converged)

With ``--train-epochs`` the backbone is trained now on the first ``--train-limit`` training images
(``timm_dgate.demo.backbone``, kept in ``--stand-in-dir``), and the document says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `benchmarks.*`

import timm_dgate
from benchmarks.common import ROOT, backbone_folder, load_trained, machine, paired_ratio
from timm_dgate.core.cache import cache_features
from timm_dgate.demo.backbone import TrainingRecord, cached_backbone
from timm_dgate.deploy.quantize import DEFAULT_GATES, MAX_CALIBRATION_IMAGES, quantize_file
from timm_dgate.deploy.runtime import OnnxGatedModel, onnx_runner
from timm_dgate.evaluation.timing import interleaved
from timm_dgate.fashion_mnist import TensorBatches, load_splits
from timm_dgate.fitting.gate_kinds import DEFAULT_GATE_KIND, GATE_KINDS, fit_kind

GOAL = {"model": "resnet50", "batch": 64, "speedup": 2.5, "drop_points": 0.5}  # gated int8 against plain int8
SIZE = 32


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "convnext_atto"])
    parser.add_argument("--backbones", type=Path, default=ROOT, help="trained backbones (benchmarks/backbones.py)")
    parser.add_argument("--train-epochs", type=int, default=0, help="train a stand-in backbone here for N epochs")
    parser.add_argument("--train-limit", type=int, default=None, help="training images for the stand-in")
    parser.add_argument("--stand-in-dir", type=Path, default=Path("runs/quantized/backbones"))
    parser.add_argument("--gate-images", type=int, default=20000, help="training images the gates are fit on")
    parser.add_argument("--gate-epochs", type=int, default=20)
    parser.add_argument("--drop", type=float, default=0.5, help="points below the plain validation accuracy")
    parser.add_argument("--quantize-gates", nargs="+", default=["int8", "fp32"], choices=["int8", "fp32"])
    parser.add_argument("--test-images", type=int, default=None, help="default: the whole test split (10,000)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64, 256])
    parser.add_argument("--timing-images", type=int, default=1024, help="images per timed pass (batch 1: a quarter)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch's threads while the ONNX variants run (their exit bookkeeping); training keeps all")
    parser.add_argument("--work", type=Path, default=Path("runs/quantized"), help="exported folders")
    parser.add_argument("--output", type=Path, default=None, help="markdown (docs/benchmarks-quantized.md)")
    parser.add_argument("--json", type=Path, default=None, help="results (docs/benchmarks-quantized.json)")
    return parser.parse_args()


def first(data: TensorDataset, n: int | None) -> TensorDataset:
    return TensorDataset(*(t[:n] for t in data.tensors)) if n else data


def backbone(name: str, args: argparse.Namespace, splits) -> tuple[torch.nn.Module, str]:
    """The backbone and a sentence saying exactly what it is (converged, or a stand-in trained here)."""
    if args.train_epochs:
        train = first(splits.train, args.train_limit)
        model = cached_backbone(name, train, args.stand_in_dir / name, epochs=args.train_epochs, val=splits.val)
        record = TrainingRecord.load(args.stand_in_dir / name)
        took = f", {record.seconds:.0f} s on the CPU" if record and record.seconds else ""
        return model.eval(), (f"stand-in: timm {name} trained here for {args.train_epochs} epochs on the first "
                              f"{len(train)} Fashion-MNIST training images{took}, **not converged**")
    record = TrainingRecord.load(backbone_folder(name, args.backbones))
    gain = record.plateau_gain() if record else None
    state = "converged" if gain is not None and gain < 0.2 else "gain over the last 3 epochs unknown or >= 0.2 pt"
    epochs = record.epochs if record else "?"
    return load_trained(name, args.backbones), f"{name} from {args.backbones / name}, {epochs} epochs ({state})"


def plain_files(model: torch.nn.Module, folder: Path, calibration: list[torch.Tensor]) -> dict[str, Path]:
    """The plain model as one float ONNX file, and that file quantized as ``export`` quantizes a segment."""
    folder.mkdir(parents=True, exist_ok=True)
    fp32, int8 = folder / "plain_fp32.onnx", folder / "plain_int8.onnx"
    torch.onnx.export(model, (calibration[0][:2],), str(fp32), dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    quantize_file(fp32, int8, iter(calibration))
    return {"plain fp32": fp32, "plain int8": int8}


def test_run(run, costs, test: list[tuple[torch.Tensor, torch.Tensor]], gated: bool, profile=None) -> dict:
    """Test accuracy and average GFLOPs of one variant (a plain runner, or a runtime under ``profile``)."""
    right, flops, exits = 0, 0.0, []
    with torch.inference_mode():
        for x, y in test:
            if gated:
                out = run(x, return_exits=True, profile=profile)
                logits, policy = out.logits, run.policy_for(profile)
                flops += costs.average(out.exits, policy.thresholds) * len(y)
                exits.append(out.exits)
            else:
                (logits,) = run(x)
                flops += costs.backbone * len(y)
            right += int((logits.argmax(1) == y).sum())
    n = sum(len(y) for _, y in test)
    row = {"accuracy": right / n, "gflops": flops / n / 1e9}
    if exits:
        row["exit_fractions"] = (torch.cat(exits).bincount(minlength=run.num_gates + 1) / n).tolist()
    return row


def measure(name: str, args: argparse.Namespace, splits) -> dict:
    started = time.perf_counter()
    model, described = backbone(name, args, splits)
    print(f"== {name}: {described}", flush=True)
    kind = GATE_KINDS[DEFAULT_GATE_KIND]
    gated = timm_dgate.wrap(model, input_size=(1, SIZE, SIZE), gate_head=kind.head,
                            gate_head_options=kind.head_options)
    train = TensorBatches(first(splits.train, args.gate_images), SIZE)
    val = list(TensorBatches(splits.val, SIZE))
    test = list(TensorBatches(first(splits.test, args.test_images), SIZE))
    fit_kind(gated, cache_features(gated, train, progress=False), kind, epochs=args.gate_epochs, progress=False)
    drop = args.drop / 100
    label = f"-{args.drop:g}pt"
    gated.calibrate(val, max_drop=drop, name=f"fp32 {label}")
    folder = args.work / name
    seconds, runs, rows = {}, {}, {}
    calibration = [x for x, _ in val]
    calibration = list(torch.cat(calibration)[:MAX_CALIBRATION_IMAGES].split(128))
    for variant, path in plain_files(gated.base_model, folder, calibration).items():
        runs[variant] = onnx_runner(path)
        rows[variant] = {"file_mb": path.stat().st_size / 2**20}
    start = time.perf_counter()
    timm_dgate.export(gated, folder / "gated_fp32")
    seconds["export fp32"] = time.perf_counter() - start
    runs["gated fp32"] = OnnxGatedModel(folder / "gated_fp32")
    for gates in args.quantize_gates:
        variant = f"gated int8, {gates} gates"
        start = time.perf_counter()
        timm_dgate.export(gated, folder / f"gated_int8_{gates}_gates", quantize="int8", calibration=val,
                          quantize_gates=gates)
        seconds[f"export int8, {gates} gates"] = time.perf_counter() - start
        runtime = OnnxGatedModel(folder / f"gated_int8_{gates}_gates")
        timm_dgate.calibrate(runtime, val, max_drop=drop, name=f"int8 {label}")
        runs[variant] = runtime
    costs = runs["gated fp32"].costs
    threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)  # onnxruntime does the work; torch only moves rows (see docs/deploy.md)
    for variant, run in runs.items():
        gated_run = isinstance(run, OnnxGatedModel)
        rows.setdefault(variant, {}).update(test_run(run, costs, test, gated_run))
        if gated_run:
            rows[variant]["file_mb"] = sum((run.folder / f).stat().st_size for f in run.manifest.segments) / 2**20
            rows[variant]["profile"] = run.active_profile
            rows[variant]["chosen_on"] = run.chosen_on.get(run.active_profile)
    carried = next(v for v in runs if v.startswith("gated int8"))
    rows[f"{carried}, fp32 thresholds"] = test_run(runs[carried], costs, test, True, profile=f"fp32 {label}")
    images = torch.cat([x for x, _ in test])
    plain_val = {v: sum(int((runs[v](x)[0].argmax(1) == y).sum()) for x, y in val) / len(splits.val.tensors[1])
                 for v in ("plain fp32", "plain int8")}
    speed: dict[str, dict[int, float]] = {v: {} for v in runs}
    passes: dict[str, dict[int, list[float]]] = {v: {} for v in runs}  # seconds of each repeat, for paired ratios
    for size in args.batch_sizes:
        count = max(size, args.timing_images // (4 if size == 1 else 1))
        batches = list(images[:count].split(size))
        timed = {v: (run, batches) for v, run in runs.items()}
        result = interleaved(timed, args.repeats)
        for variant, values in result.items():
            speed[variant][size] = sum(len(b) for b in batches) / statistics.median(values)
            passes[variant][size] = values
        print(f"  batch {size}: " + ", ".join(f"{v} {speed[v][size]:.0f}/s" for v in runs), flush=True)
    for variant in runs:
        rows[variant]["images_per_s"] = speed[variant]
        rows[variant]["seconds"] = passes[variant]
    torch.set_num_threads(threads)
    return {
        "model": name, "backbone": described, "plain_val_accuracy": plain_val,
        "rows": rows, "export_seconds": seconds, "seconds": time.perf_counter() - started,
        "drop_points": args.drop, "test_images": len(images), "gate_kind": DEFAULT_GATE_KIND,
        "torch_threads": args.torch_threads,
    }


def default_int8(rows: dict) -> str:
    """The gated int8 row ``export(..., quantize="int8")`` gives by default (else the first measured)."""
    name = f"gated int8, {DEFAULT_GATES} gates"
    return name if name in rows else next(v for v in rows if v.startswith("gated int8") and "seconds" in rows[v])


def speedup(rows: dict, fast: str, slow: str, batch: int) -> float:
    """How many times faster ``fast`` ran than ``slow``: the median of per-repeat ratios (timed interleaved)."""
    return paired_ratio(rows[slow]["seconds"][batch], rows[fast]["seconds"][batch])


def goal_line(result: dict, batch: int) -> str:
    rows = result["rows"]
    name = default_int8(rows)
    if batch not in rows[name]["seconds"]:
        return f"batch {batch} was not timed"
    ratio, combined = speedup(rows, name, "plain int8", batch), speedup(rows, name, "plain fp32", batch)
    gap = 100 * (rows["plain int8"]["accuracy"] - rows[name]["accuracy"])
    met = ratio >= GOAL["speedup"] and gap <= GOAL["drop_points"]
    goal = "issue 29's goal" if result["model"] == GOAL["model"] else f"issue 29's goal (set for {GOAL['model']})"
    return (f"{goal}: {name} runs **{ratio:.2f}x** plain int8 at batch {batch}, {gap:+.2f} points below its test "
            f"accuracy (goal: >= {GOAL['speedup']}x at <= {GOAL['drop_points']} pt: **{'met' if met else 'missed'}**); "
            f"combined speed-up over plain fp32: **{combined:.2f}x**")


def markdown(results: list[dict], command: str, args: argparse.Namespace) -> str:
    lines = [
        "# Int8 quantization and early exit together",
        "",
        f"Generated by `{command}` on {datetime.date.today()}; {machine()}; onnxruntime on the CPU "
        f"(its default threads; torch, which only runs the exit bookkeeping, at {args.torch_threads}). "
        f"Thresholds target -{args.drop:g} pt from each model's own plain validation accuracy; every number is on "
        "the test split. GFLOPs count multiply-adds alike in float and int8 (gates included). See docs/deploy.md, "
        "\"Quantized segments (int8)\".",
        "",
    ]
    for result in results:
        sizes = sorted({s for row in result["rows"].values() for s in row.get("images_per_s", {})})
        lines += [f"## {result['model']}", "", f"Backbone: {result['backbone']}. Test images: "
                  f"{result['test_images']}; gates: {result['gate_kind']}.", ""]
        header = "| variant | test accuracy | GFLOPs | " + " | ".join(f"images/s, batch {s}" for s in sizes)
        lines += [header + " | ONNX MB |", "|---" * (4 + len(sizes)) + "|"]
        for variant, row in result["rows"].items():
            speed = row.get("images_per_s", {})
            cells = [f"{speed[s]:,.0f}" if s in speed else "-" for s in sizes]
            size = f"{row['file_mb']:.1f}" if "file_mb" in row else "-"
            lines.append(f"| {variant} | {100 * row['accuracy']:.2f}% | {row['gflops']:.4f} | "
                         + " | ".join(cells) + f" | {size} |")
        name, rows = default_int8(result["rows"]), result["rows"]
        pairs = [("plain int8", "plain fp32"), ("gated fp32", "plain fp32"), (name, "plain int8"),
                 (name, "plain fp32"), *[(v, "plain int8") for v in rows if v.startswith("gated int8")
                                         and v != name and "seconds" in rows[v]]]
        lines += ["", "Speed-ups (median of per-repeat ratios, timed interleaved):", "",
                  "| faster | than | " + " | ".join(f"batch {s}" for s in sizes) + " |",
                  "|---" * (2 + len(sizes)) + "|"]
        lines += [f"| {a} | {b} | " + " | ".join(f"{speedup(rows, a, b, s):.2f}x" for s in sizes) + " |"
                  for a, b in pairs]
        lines += ["", "- " + goal_line(result, GOAL["batch"]), ""]
        fractions = {v: r["exit_fractions"] for v, r in result["rows"].items() if "exit_fractions" in r}
        lines += [f"- exits (gates, then head) of {v}: " + ", ".join(f"{f:.1%}" for f in fr)
                  for v, fr in fractions.items()]
        lines += ["- export seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["export_seconds"].items()),
                  f"- whole run for this model: {result['seconds']:.0f} s", ""]
    return "\n".join(lines)


def main() -> None:
    args = arguments()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    splits = load_splits()
    results = []
    for name in args.models:
        results.append(measure(name, args, splits))
        text = markdown(results, command, args)
        if args.output:
            args.output.write_text(text)
        if args.json:
            args.json.write_text(json.dumps({"command": command, "machine": machine(), "results": results},
                                            indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
