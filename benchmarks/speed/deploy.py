"""Does early exit keep its savings when deployed? Plain vs gated: eager, compiled, ONNX.

Why: people deploy timm models with ``torch.compile`` or ONNX. ``gated.compile()`` compiles the
segments between exits once; ``timm_dgate.export`` writes one ONNX file per segment, run by
``timm_dgate.deploy.runtime.OnnxGatedModel``. For each model this times, side by side in one run
(``timm_dgate.evaluation.timing``: variants interleaved, medians of per-repeat ratios), at each batch size:

- ``plain eager``, ``plain compiled`` (``torch.compile(model, dynamic=True)``), ``plain ONNX``
  (the whole model as one ONNX file, onnxruntime);
- ``gated eager``, ``gated compiled`` (``gated.compile()``), ``gated ONNX`` (``export`` +
  ``OnnxGatedModel``), with gate 0's threshold at the median of its scores on the benchmark images,
  so half of them leave at gate 0 and the other gates are closed: the FLOPs ideal speed-up is
  ``backbone / average FLOPs`` of that run;

and the seconds of each compiled variant's first call (its compile time), the time of each segment
at the largest batch against its share of the FLOPs, and what channels_last changes. Random
weights: the executor's speed does not depend on what the weights learned, only on where samples
exit. ``--compile-paths`` also compares ``gated.compile()`` with ``torch.compile(gated)`` (graphs and
seconds over batches of changing sizes) on a tiny model.

``--device cuda`` moves the models and the images to the GPU and times everything there
(``timm_dgate.evaluation.timing`` synchronises CUDA); ONNX then runs on onnxruntime's CUDAExecutionProvider
(``onnxruntime-gpu``; without it, asking for ONNX on CUDA fails at start), its inputs and outputs
going through host memory as ``OnnxGatedModel``'s do. ``--modes`` picks what is built and timed
(default: all three); the document holds one run, on one device.

    .venv/bin/python benchmarks/speed/deploy.py --models resnet18 resnet50 convnext_atto \
        --output docs/benchmarks-deploy.md
    .venv/bin/python benchmarks/speed/deploy.py --device cuda --modes eager compiled --models resnet50 convnext_atto \
        --batch-sizes 1 256 1024 --output docs/benchmarks-deploy-gpu.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `benchmarks.*`

import timm_dgate
from benchmarks.common import half_exit_thresholds, machine, paired_ratio, random_gated
from timm_dgate.deploy.runtime import OnnxGatedModel
from timm_dgate.deploy.segments import Chain, exit_chain
from timm_dgate.evaluation.timing import Run, interleaved, time_pass

MODES = ("eager", "compiled", "ONNX")
GOALS = {"compiled": 0.85, "ONNX": 0.8}  # fractions of the FLOPs ideal speed-up at the largest batch (issue 14)
VARIANT_COUNTS = {1: "two", 2: "four", 3: "six"}  # variants timed side by side (plain and gated) per number of modes


def onnx_providers(device: torch.device) -> list[str]:
    """onnxruntime's execution providers for ``device``; on CUDA, SystemExit where onnxruntime cannot run there."""
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise SystemExit(f"ONNX on {device} needs onnxruntime's CUDAExecutionProvider (pip install onnxruntime-gpu); "
                         f"this onnxruntime has {', '.join(available)}. Leave ONNX out of --modes or install it.")
    if device.index not in (None, 0):  # the provider's default device_id; the sessions take provider names only
        raise SystemExit(f"ONNX on {device}: onnxruntime's CUDAExecutionProvider runs on cuda:0 here; "
                         "pick that device (CUDA_VISIBLE_DEVICES) or leave ONNX out of --modes.")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def plain_onnx(model: torch.nn.Module, example: torch.Tensor, folder: Path, providers: list[str]) -> Run:
    """The whole plain model as one ONNX file with a dynamic batch axis, run by onnxruntime as a user would.

    Inputs and outputs go through host memory, as in ``OnnxGatedModel``'s segments.
    """
    path = folder / "plain.onnx"
    torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers)  # default options: as users run it
    if session.get_providers()[0] != providers[0]:  # onnxruntime falls back to the CPU with a mere warning
        raise RuntimeError(f"onnxruntime could not start {providers[0]} (session has {session.get_providers()})")
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0]).to(x.device)


def ideal_speedup(gated: timm_dgate.GatedModel, images: torch.Tensor) -> float:
    with torch.inference_mode():
        exits = gated(images, return_exits=True).exits
    return gated.costs.backbone / gated.costs.average(exits, gated.thresholds)


def segment_rows(gated: timm_dgate.GatedModel, batch: torch.Tensor, repeats: int) -> list[dict[str, object]]:
    """Eager seconds of each segment on the whole batch (no exits), against its share of the backbone's FLOPs."""
    backbone = gated.base_model
    pieces = exit_chain(backbone, [b.module for b in gated.boundaries], batch[:2])
    chains = [Chain([backbone.get_submodule(n) for n in names]).eval() for names in pieces]
    inputs = [batch]
    with torch.inference_mode():
        for chain in chains[:-1]:
            inputs.append(chain(inputs[-1]))
    seconds = interleaved({f"segment {k}": (chain, [x]) for k, (chain, x) in enumerate(zip(chains, inputs))},
                          repeats)
    costs = gated.costs
    edges = [0.0, *costs.to_gate, costs.backbone]
    total = sum(statistics.median(s) for s in seconds.values())
    return [{"segment": k, "modules": f"{names[0]} .. {names[-1]}" if len(names) > 1 else names[0],
             "flops share": (edges[k + 1] - edges[k]) / costs.backbone,
             "time share": statistics.median(seconds[f"segment {k}"]) / total,
             "ms": 1000 * statistics.median(seconds[f"segment {k}"])} for k, names in enumerate(pieces)]


def channels_last_row(plain: torch.nn.Module, gated: timm_dgate.GatedModel, images: torch.Tensor, batch: int,
                      repeats: int) -> dict[str, float]:
    """Plain and gated eager at ``batch``, in the default layout and in channels_last, interleaved."""
    plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    gated_cl = copy.deepcopy(gated).to(memory_format=torch.channels_last)
    batches = list(images.split(batch))
    cl_batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    seconds = interleaved({"plain": (plain, batches), "gated": (gated, batches),
                           "plain CL": (plain_cl, cl_batches), "gated CL": (gated_cl, cl_batches)}, repeats)
    return {
        "plain CL / plain": paired_ratio(seconds["plain"], seconds["plain CL"]),
        "gated CL / gated": paired_ratio(seconds["gated"], seconds["gated CL"]),
        "speed-up": paired_ratio(seconds["plain"], seconds["gated"]),
        "speed-up CL": paired_ratio(seconds["plain CL"], seconds["gated CL"]),
    }


def with_thresholds(run, thresholds: list[float]):
    """``run`` with its gates set to ``thresholds`` before each call (the variants below share one model)."""
    def call(x: torch.Tensor) -> torch.Tensor:
        run.set_thresholds(thresholds)
        return run(x)
    return call


def time_ideals(runs: dict[str, Run], modes: list[str], batches: list[torch.Tensor], half: list[float],
                leave: float, repeats: int) -> dict[str, float]:
    """Per mode, the speed-up the exits would give if splitting the batch cost nothing.

    The FLOPs ideal assumes time follows FLOPs; the stem and first stage are memory-bound, so it
    does not. Here each gated variant is timed with every sample leaving at gate 0 and with every
    gate closed, interleaved with the plain model: ``plain / (leave * at_gate_0 + (1 - leave) * closed)``.
    A speed-up against this ideal measures the executor alone; the ideal against the FLOPs ideal,
    the hardware.
    """
    closed = [math.inf] * len(half)
    at_gate_0 = [-math.inf, *closed[1:]]
    ideals = {}
    for mode in modes:
        gated = runs[f"gated {mode}"]
        seconds = interleaved({"plain": (runs[f"plain {mode}"], batches),
                               "closed": (with_thresholds(gated, closed), batches),
                               "gate 0": (with_thresholds(gated, at_gate_0), batches)}, repeats)
        gated.set_thresholds(half)
        plain, shut, first = (statistics.median(seconds[k]) for k in ("plain", "closed", "gate 0"))
        ideals[mode] = plain / (leave * first + (1 - leave) * shut)
    return ideals


def measure(name: str, args: argparse.Namespace) -> dict[str, object]:
    input_size = (args.in_chans, args.input_size, args.input_size)
    plain, gated = random_gated(name, input_size, args.device)
    images = torch.randn(args.images, *input_size, generator=torch.Generator().manual_seed(1)).to(args.device)
    half = list(half_exit_thresholds(gated, images))
    gated.set_thresholds(half)
    probe = images[: max(args.batch_sizes)]
    compile_s: dict[str, float] = {}
    runs: dict[str, Run] = {}  # plain variants first, then gated, each in the order of MODES
    gated_runs: dict[str, Run] = {}
    if "eager" in args.modes:
        runs["plain eager"], gated_runs["gated eager"] = plain, gated
    if "compiled" in args.modes:
        runs["plain compiled"] = torch.compile(copy.deepcopy(plain), dynamic=True)
        gated_runs["gated compiled"] = copy.deepcopy(gated)
        compile_s["segments"] = len(gated_runs["gated compiled"].compile())
        compile_s["plain compiled"] = time_pass(runs["plain compiled"], [probe])
        compile_s["gated compiled"] = time_pass(gated_runs["gated compiled"], [probe])
    with tempfile.TemporaryDirectory() as tmp:
        if "ONNX" in args.modes:
            start = time.perf_counter()
            runs["plain ONNX"] = plain_onnx(plain, images[:2], Path(tmp), args.providers)
            timm_dgate.export(gated, Path(tmp) / "gated")
            compile_s["export"] = time.perf_counter() - start
            gated_runs["gated ONNX"] = OnnxGatedModel(Path(tmp) / "gated", providers=args.providers)
        runs.update(gated_runs)
        rows = []
        for batch in args.batch_sizes:
            timed = images[: args.batch1_images] if batch == 1 else images
            batches = list(timed.split(batch))
            for run in runs.values():  # every compiled shape bucket warm before timing
                time_pass(run, batches[:1])
            seconds = interleaved({n: (run, batches) for n, run in runs.items()}, args.repeats)
            row = {"batch": batch, "ideal": ideal_speedup(gated, timed),
                   **{f"{n} img/s": len(timed) / statistics.median(s) for n, s in seconds.items()}}
            for mode in args.modes:
                row[f"{mode} speed-up"] = paired_ratio(seconds[f"plain {mode}"], seconds[f"gated {mode}"])
            rows.append(row)
            print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
        with torch.inference_mode():
            leave = (gated(images, return_exits=True).exits == 0).float().mean().item()
        ideals = time_ideals(runs, args.modes, list(images.split(max(args.batch_sizes))), half, leave, args.repeats)
        print(name, "time ideals", ideals, flush=True)
    largest = max(args.batch_sizes)
    big = images[:largest]
    result = {"model": name, "gated": gated, "rows": rows, "compile_s": compile_s, "time_ideals": ideals,
              "segments": segment_rows(gated, big, args.repeats),
              "channels_last": channels_last_row(plain, gated, images, largest, args.repeats)}
    print(name, result["segments"], result["channels_last"], compile_s, flush=True)
    return result


def compile_paths(args: argparse.Namespace) -> list[dict[str, float]]:
    """``gated.compile()`` against ``torch.compile(gated)``: graphs and seconds over batches of changing sizes.

    A first pass of 12 batch sizes, then 12 new sizes with other thresholds (new exit patterns):
    graphs compiled in each, graph breaks, the seconds of each pass (compiling included), and a
    warm pass over the first sizes again.
    """
    first_sizes = [1, 16, 37, 64, 5, 128, 200, 9, 256, 77, 3, 150]
    new_sizes = [2, 23, 50, 99, 7, 180, 31, 240, 11, 60, 130, 4]
    input_size = (args.in_chans, args.input_size, args.input_size)
    _, gated = random_gated("test_resnet", input_size, args.device)
    images = torch.randn(256, *input_size, generator=torch.Generator().manual_seed(1)).to(args.device)
    half = half_exit_thresholds(gated, images)
    other = (half[0], half[0], math.inf)  # exits at gates 0 and 1: other patterns than the first pass
    out = []
    for label in ("gated.compile()", "torch.compile(gated)"):
        torch._dynamo.reset()
        counters.clear()
        model = copy.deepcopy(gated)
        model.set_thresholds(half)
        run = model
        if label == "gated.compile()":
            model.compile(backend=args.paths_backend)
        else:
            run = torch.compile(model, backend=args.paths_backend)
        row = {"path": label}
        for name, sizes, thresholds in (("first", first_sizes, half), ("new", new_sizes, other)):
            model.set_thresholds(thresholds)
            before = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            for n in sizes:
                time_pass(run, [images[:n]])
            row[f"{name} pass s"] = time.perf_counter() - start
            row[f"{name} graphs"] = counters["stats"]["unique_graphs"] - before
        model.set_thresholds(half)
        row["warm pass s"] = statistics.median(
            sum(time_pass(run, [images[:n]]) for n in first_sizes) for _ in range(args.repeats))
        row["graph breaks"] = sum(counters["graph_break"].values())
        out.append(row)
        print(row, flush=True)
    return out


def model_section(r: dict[str, object], args: argparse.Namespace) -> list[str]:
    gated, rows, compile_s = r["gated"], r["rows"], r["compile_s"]
    setup = []  # what the compiled and ONNX variants cost before their first timed call
    if "compiled" in args.modes:
        setup.append(f"First call (compile) seconds at batch {max(args.batch_sizes)}: plain "
                     f"{compile_s['plain compiled']:.1f}, gated {compile_s['gated compiled']:.1f} "
                     f"({compile_s['segments']} segments)")
    if "ONNX" in args.modes:
        setup.append(f"ONNX export of both {compile_s['export']:.1f} s")
    variants = [f"{kind} {m}" for kind in ("plain", "gated") for m in args.modes]
    lines = [
        f"## {r['model']}",
        "",
        f"Gates {', '.join(f'`{b.name}`' for b in gated.boundaries)}; half of the images leave at gate 0 (FLOPs "
        f"ideal speed-up {rows[-1]['ideal']:.2f}x)." + (f" {'; '.join(setup)}." if setup else ""),
        "",
        f"| batch | {' | '.join(variants)} | ideal | "
        + " | ".join(f"{m} speed-up (fraction)" for m in args.modes) + " |",
        "|---" * (2 + len(variants) + len(args.modes)) + "|",
    ]
    for row in rows:
        speedups = " | ".join(f"{row[f'{m} speed-up']:.2f}x ({row[f'{m} speed-up'] / row['ideal']:.2f})"
                              for m in args.modes)
        rates = " | ".join(f"{row[f'{v} img/s']:.0f}" for v in variants)
        lines.append(f"| {row['batch']} | {rates} | {row['ideal']:.2f}x | {speedups} |")
    last, ideals = rows[-1], r["time_ideals"]
    lines += ["", f"Against the time ideal at batch {max(args.batch_sizes)} (what the exits would give if splitting "
              "the batch cost nothing: the gated model timed with every sample leaving at gate 0 and with every "
              "gate closed): " + "; ".join(
                  f"{mode} ideal {ideals[mode]:.2f}x, reached {last[f'{mode} speed-up'] / ideals[mode]:.2f}"
                  for mode in args.modes) + "."]
    lines += ["", f"Where the time goes at batch {max(args.batch_sizes)} (eager, every sample through every segment):",
              "", "| segment | modules | share of FLOPs | share of time | ms |", "|---|---|---|---|---|"]
    for s in r["segments"]:
        lines.append(f"| {s['segment']} | `{s['modules']}` | {s['flops share']:.0%} | {s['time share']:.0%} "
                     f"| {s['ms']:.1f} |")
    cl = r["channels_last"]
    lines += ["", f"channels_last at batch {max(args.batch_sizes)} (eager): plain {cl['plain CL / plain']:.2f}x "
              f"and gated {cl['gated CL / gated']:.2f}x the speed of the default layout; gated speed-up "
              f"{cl['speed-up']:.2f}x in the default layout, {cl['speed-up CL']:.2f}x in channels_last.", ""]
    return lines


def device_note(device: torch.device) -> str:
    """The report's last words: what ran the timed passes."""
    if device.type == "cuda":
        return f"Device: {torch.cuda.get_device_name(device)} (`{device}`); the CPU numbers are in a separate run."
    return "Device: the CPU."


def report(args: argparse.Namespace, results: list[dict[str, object]], paths: list[dict[str, float]],
           env: str) -> str:
    largest = max(args.batch_sizes)
    how = ""  # how the compiled and ONNX variants measured are run
    if "compiled" in args.modes:
        how += "Compiled: inductor, `dynamic=True` (plain: `torch.compile(model)`; gated: `gated.compile()`). "
    if "ONNX" in args.modes:
        host = ", inputs and outputs through host memory" if args.device.type == "cuda" else ""
        how += (f"ONNX: onnxruntime with `{args.providers[0]}`{host} (plain: the whole model as one file, default "
                "session options; gated: `timm_dgate.export` + `runtime.OnnxGatedModel`, whose sessions do not spin "
                "idle workers). ")
    lines = [
        "# Deployment benchmark: early exit compiled and exported",
        "",
        f"Random weights (the executor's speed depends on where samples exit, not on what the weights learned), "
        f"10 classes, input {args.in_chans}x{args.input_size}x{args.input_size}; gate 0's threshold at the median "
        f"of its scores on the {args.images} benchmark images (`benchmarks/common.py` `half_exit_thresholds`), "
        f"the other gates closed. Images/s; {args.repeats} repeats, the {VARIANT_COUNTS[len(args.modes)]} variants "
        f"interleaved on the same batches (`evaluation.timing`), `torch.inference_mode()`; at batch 1 the first "
        f"{args.batch1_images} images. {how}Speed-ups are medians of per-repeat ratios against the plain model in "
        "the same mode; *fraction* is speed-up / FLOPs ideal.",
        "",
        "Absolute images/s move between runs on a shared machine (the load average is below), so only the "
        "ratios measured interleaved in one run mean something.",
        "",
    ]
    goals = [m for m in GOALS if m in args.modes]
    if goals:
        lines += [
            f"Goals (issue 14), at batch {largest}: " + "; ".join(
                f"gated {m} reaches {GOALS[m]} of {'it' if k else 'the FLOPs ideal'} against plain {m}"
                for k, m in enumerate(goals)) + ".",
            "",
            "| model | FLOPs ideal | " + " | ".join(f"{m} fraction | goal met" for m in goals) + " | "
            + " | ".join(f"{m}: time ideal, fraction of it" for m in goals) + " |",
            "|---" * (2 + 3 * len(goals)) + "|",
        ]
        for r in results:
            row, ideals = r["rows"][-1], r["time_ideals"]
            fractions = {m: row[f"{m} speed-up"] / row["ideal"] for m in goals}
            met = " | ".join(f"{fractions[m]:.2f} | {'yes' if fractions[m] >= GOALS[m] else '**no**'}" for m in goals)
            reached = " | ".join(f"{ideals[m]:.2f}x, {row[f'{m} speed-up'] / ideals[m]:.2f}" for m in goals)
            lines.append(f"| {r['model']} | {row['ideal']:.2f}x | {met} | {reached} |")
        lines.append("")
    lines += ["The *time ideal* is the speed-up these exits would give if cutting the batch at the gate cost "
              "nothing (per model below): where it is far under the FLOPs ideal, the part before gate 0 takes more "
              "of the time than of the FLOPs (memory-bound stem and first stage), which no executor can change; "
              "the fraction of the time ideal reached is what the executor loses.", ""]
    for r in results:
        lines += model_section(r, args)
    if paths:
        lines += ["## gated.compile() against torch.compile(gated)", "",
                  f"timm `test_resnet` (random), half leave at gate 0; 12 batches of sizes 1 to 256, backend "
                  f"`{args.paths_backend}`: "
                  "graphs compiled and seconds of that pass (compiling included), then 12 new sizes with samples "
                  "leaving at gates 0 and 1 (new exit patterns), then a warm pass over the first sizes.", "",
                  "| path | graphs, first pass | graphs, new sizes and exits | graph breaks | first pass s "
                  "| new pass s | warm pass s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| `{p['path']}` | {p['first graphs']} | {p['new graphs']} | {p['graph breaks']} "
                  f"| {p['first pass s']:.1f} | {p['new pass s']:.1f} | {p['warm pass s']:.2f} |" for p in paths]
        lines.append("")
    lines += [f"Machine: {env}. Date: {datetime.date.today()}. Command: "
              f"`{shlex.join([Path(sys.executable).name, *sys.argv])}`. {device_note(args.device)}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "convnext_atto"])
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--images", type=int, default=512, help="images per timed pass")
    parser.add_argument("--batch1-images", type=int, default=64, help="images per timed pass at batch 1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-paths", action="store_true", help="also gated.compile() vs torch.compile(gated)")
    parser.add_argument("--paths-backend", default="inductor", help="torch.compile backend for --compile-paths")
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown file to write, one run on one device (default: print only)")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"),
                        help="where the models run and everything is timed: cpu or cuda[:N]")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="what is built and timed, plain and gated (default: all)")
    args = parser.parse_args(argv)
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: cpu or cuda")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but torch sees no CUDA device")
    args.modes = [m for m in MODES if m in args.modes]  # tables list modes in one order, each once
    args.providers = onnx_providers(args.device) if "ONNX" in args.modes else []
    env = machine()
    results: list[dict[str, object]] = []
    paths = compile_paths(args) if args.compile_paths else []
    for name in args.models:  # the document is rewritten after each model, so a cut-short run keeps what it measured
        results.append(measure(name, args))
        text = report(args, results, paths, env)
        if args.output:
            args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
