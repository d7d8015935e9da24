"""Does early exit keep its savings when the model is compiled? Plain vs gated, eager vs compiled.

Why: people deploy timm models with ``torch.compile``. ``torch.compile(gated)`` breaks the graph at
every open gate and recompiles per batch size and exit pattern; ``gated.compile()`` compiles the
segments between exits once. This times, side by side in one run (``timm_dgate.timing``: variants
interleaved, medians of per-repeat ratios), for each batch size:

- ``plain eager`` and ``plain compiled`` (``torch.compile(model, dynamic=True)``);
- ``gated eager`` and ``gated compiled`` (``gated.compile()``), with gate 0's threshold at the
  median of its scores on the benchmark images, so half of them leave at gate 0 and the other
  gates are closed: the FLOPs ideal speed-up is ``backbone / average FLOPs`` of that run;

and the seconds of each compiled variant's first call (its compile time). Random weights: the
executor's speed does not depend on what the weights learned, only on where samples exit.

    .venv/bin/python benchmarks/deploy.py --model resnet18 --output docs/benchmarks-deploy.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from common import half_exit_thresholds, machine

import timm_dgate
from timm_dgate.timing import interleaved, paired_ratio


def build(name: str, input_size: tuple[int, int, int]) -> tuple[torch.nn.Module, timm_dgate.GatedModel]:
    """A random-init timm model and a gated copy of it with random gate weights (both in eval mode)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=input_size[0]).eval()
    gated = timm_dgate.wrap(copy.deepcopy(model), input_size=input_size)
    for gate in gated.gates:
        torch.nn.init.normal_(gate.fc.weight, std=0.1)
    return model, gated


def first_call_seconds(run, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        run(x)
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> tuple[list[dict[str, float]], dict[str, float], timm_dgate.GatedModel]:
    input_size = (args.in_chans, args.input_size, args.input_size)
    plain, gated = build(args.model, input_size)
    images = torch.randn(args.images, *input_size, generator=torch.Generator().manual_seed(1))
    half = half_exit_thresholds(gated, images)
    gated.set_thresholds(half)
    with torch.inference_mode():
        exits = gated(images, return_exits=True).exits
    ideal = gated.costs.backbone / gated.costs.average(exits, half)
    plain_compiled = torch.compile(copy.deepcopy(plain), dynamic=True)
    gated_compiled = copy.deepcopy(gated)
    segments = gated_compiled.compile()
    probe = images[: max(args.batch_sizes)]
    compile_s = {"plain compiled": first_call_seconds(plain_compiled, probe),
                 "gated compiled": first_call_seconds(gated_compiled, probe), "segments": len(segments)}
    runs = {"plain eager": plain, "plain compiled": plain_compiled, "gated eager": gated,
            "gated compiled": gated_compiled}
    rows = []
    for batch in args.batch_sizes:
        batches = list(images.split(batch))
        for run in runs.values():  # every compiled shape bucket warm before timing
            first_call_seconds(run, batches[0])
        seconds = interleaved({name: (run, batches) for name, run in runs.items()}, args.repeats)
        rows.append({
            "batch": batch,
            **{f"{name} img/s": len(images) / statistics.median(s) for name, s in seconds.items()},
            "eager speed-up": paired_ratio(seconds["plain eager"], seconds["gated eager"]),
            "compiled speed-up": paired_ratio(seconds["plain compiled"], seconds["gated compiled"]),
            "ideal": ideal,
        })
        print(rows[-1], flush=True)
    return rows, compile_s, gated


def report(args: argparse.Namespace, rows: list[dict[str, float]], compile_s: dict[str, float],
           gated: timm_dgate.GatedModel, env: str) -> str:
    lines = [
        "# Deployment benchmark: early exit under torch.compile",
        "",
        f"timm `{args.model}`, random weights, input {args.in_chans}x{args.input_size}x{args.input_size}, gates "
        f"{', '.join(f'`{b.name}`' for b in gated.boundaries)}; half of the {args.images} images leave at gate 0 "
        f"(FLOPs ideal speed-up {rows[0]['ideal']:.2f}x). {args.repeats} repeats, variants interleaved, "
        "`torch.inference_mode()`. Compiled: inductor, `dynamic=True`. Speed-ups are medians of per-repeat ratios "
        "against the plain model in the same mode; *fraction* is speed-up / FLOPs ideal.",
        "",
        f"First call (compile) seconds: plain {compile_s['plain compiled']:.1f}, "
        f"gated {compile_s['gated compiled']:.1f} ({compile_s['segments']} segments); inductor's kernel cache "
        "(`/tmp/torchinductor_*`) was warm from an earlier run, a cold first compile takes minutes on 2 cores.",
        "",
        "| batch | plain eager img/s | plain compiled img/s | gated eager img/s | gated compiled img/s "
        "| eager speed-up (fraction) | compiled speed-up (fraction) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['plain eager img/s']:.0f} | {r['plain compiled img/s']:.0f} | "
            f"{r['gated eager img/s']:.0f} | {r['gated compiled img/s']:.0f} | "
            f"{r['eager speed-up']:.2f}x ({r['eager speed-up'] / r['ideal']:.2f}) | "
            f"{r['compiled speed-up']:.2f}x ({r['compiled speed-up'] / r['ideal']:.2f}) |"
        )
    lines += ["", f"Machine: {env}. Date: {datetime.date.today()}. Command: "
              f"`{shlex.join([Path(sys.executable).name, *sys.argv])}`. GPU numbers: not measured yet.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--images", type=int, default=512, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args(argv)
    rows, compile_s, gated = measure(args)
    text = report(args, rows, compile_s, gated, machine())
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
