"""Ray Serve under open-loop load: a gated model per segment and whole against the plain model (issue 28).

One gated Fashion-MNIST classifier with its ``iso`` profile (default-kind gates, thresholds at most 0.1 point
below the plain model on validation) is served three ways on a local Ray with ``timm_dgate.serve.build_app``:

- ``plain``: the backbone without its exits, one deployment (the same batching as the others);
- ``whole``: the gated model in one deployment, the refill executor inside the replica;
- ``segments``: one deployment per segment, survivors handed on through deployment handles;

and ``echo``, the same ingress in front of a deployment that answers at once without running a model: what
Serve itself costs per request on this machine, the ceiling of every shape.

Each gets the same bounded open-loop load over HTTP on localhost: at each rate in ``--rates`` a fixed number
of requests (``--requests``) with Poisson arrivals, sent whether or not earlier ones were answered; latency runs
from a request's scheduled time to its answer, so a server that falls behind shows it. A rate is *sustained*
when every request is answered, the throughput reaches 90% of the rate offered (the Poisson draw's) and p99
stays within a bound: the first of ``--p99-bounds-ms`` (250 ms) is the stated one, the others show how much the
answer depends on it. A shape stops after the first rate it cannot keep up with (an error, or throughput under
90% of the rate offered). The goals of the issue: the gated model sustains at least 2x the plain model's highest
rate, and at that rate its p99 is at most half the plain model's.

    .venv/bin/python benchmarks/serve.py --output docs/benchmarks-serve.md --json docs/benchmarks-serve.json

The backbone is the demo's (``runs/demo/backbone``) when it is there, else a stand-in trained here on the first
``--train-limit`` training images for ``--train-epochs`` (``timm_dgate.demo.backbone``, kept in ``--stand-in-dir``;
**not converged**), and the document says which. Each replica runs torch with ``--torch-threads`` (the whole and
plain replicas) or ``--segment-threads`` (each segment's); the load generator runs in this process, on the same
cores.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import math
import random
import shlex
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `benchmarks.*`

import timm_dgate
from benchmarks.common import machine
from timm_dgate.demo.backbone import TrainingRecord, cached_backbone
from timm_dgate.demo.pipeline import DROPS
from timm_dgate.fashion_mnist import TensorBatches, load_splits

SIZE = 32
DEMO_BACKBONE = Path("runs/demo/backbone")
GOAL = {"rate_ratio": 2.0, "p99_ratio": 0.5}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="the stand-in's architecture (without the demo's)")
    parser.add_argument("--backbone", type=Path, default=None, help="a trained backbone folder (timm's layout)")
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=10000, help="training images for the stand-in")
    parser.add_argument("--stand-in-dir", type=Path, default=Path("runs/serve/backbones"))
    parser.add_argument("--gate-images", type=int, default=10000, help="training images the gates are fit on")
    parser.add_argument("--test-images", type=int, default=2000, help="test images: accuracy, and the requests")
    parser.add_argument("--work", type=Path, default=Path("runs/serve"), help="the gated folder")
    parser.add_argument("--shapes", nargs="+", default=["echo", "plain", "whole", "segments"],
                        help="echo: the ingress and a deployment that answers without a model (Serve's own cost)")
    parser.add_argument("--rates", nargs="+", type=float, default=[10, 20, 30, 40, 50, 60, 80, 100, 120, 160])
    parser.add_argument("--requests", type=int, default=400, help="requests per rate")
    parser.add_argument("--p99-bounds-ms", nargs="+", type=float, default=[250.0, 100.0, 500.0],
                        help="p99 bounds a sustained rate keeps; the first is the stated one")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--torch-threads", type=int, default=2, help="torch threads of the whole and plain replicas")
    parser.add_argument("--segment-threads", type=int, default=2, help="torch threads of each segment's replica")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--output", type=Path, default=None, help="markdown (docs/benchmarks-serve.md)")
    parser.add_argument("--json", type=Path, default=None, help="results (docs/benchmarks-serve.json)")
    parser.add_argument("--from-json", type=Path, default=None, help="write the markdown again from saved results")
    return parser.parse_args()


def first(data: TensorDataset, n: int | None) -> TensorDataset:
    return TensorDataset(*(t[:n] for t in data.tensors)) if n else data


def backbone(args: argparse.Namespace, splits) -> tuple[torch.nn.Module, str]:
    """The backbone and a sentence saying exactly what it is."""
    folder = args.backbone or (DEMO_BACKBONE if (DEMO_BACKBONE / "model.safetensors").is_file() else None)
    if folder is not None:
        import timm

        record = TrainingRecord.load(folder)
        epochs = f"{record.model}, {record.epochs} epochs" if record else "training unrecorded"
        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval(), f"{folder} ({epochs}, not converged)"
    train = first(splits.train, args.train_limit)
    model = cached_backbone(args.model, train, args.stand_in_dir / args.model, epochs=args.train_epochs,
                            val=splits.val)
    record = TrainingRecord.load(args.stand_in_dir / args.model)
    took = f", {record.seconds:.0f} s" if record and record.seconds else ""
    return model.eval(), (f"stand-in: timm {args.model} trained here for {args.train_epochs} epochs on the first "
                          f"{len(train)} Fashion-MNIST training images (the demo's recipe{took}), **not converged**")


def gated_folder(args: argparse.Namespace, splits, model: torch.nn.Module) -> tuple[Path, timm_dgate.GatedModel]:
    """Default-kind gates fit on the first ``--gate-images`` training images, ``iso`` calibrated on validation."""
    folder = args.work / "gated"
    if (folder / "profiles.json").is_file():
        gated = timm_dgate.from_pretrained(folder).eval()
        if "iso" in gated.profiles:
            print(f"gated model: loaded from {folder}")
            return folder, gated
    gated = timm_dgate.wrap(model, input_size=(1, SIZE, SIZE), gate_hidden=128)
    timm_dgate.fit(gated, TensorBatches(first(splits.train, args.gate_images), SIZE), loss="ce", progress=False)
    gated.calibrate(TensorBatches(splits.val, SIZE), max_drop=DROPS["iso"], name="iso")
    gated.save_pretrained(folder)
    return folder, gated.eval()


@torch.inference_mode()
def accuracy(gated: timm_dgate.GatedModel, test: TensorDataset) -> dict:
    right_plain = right_gated = 0
    exits, flops = [], 0.0
    for x, y in TensorBatches(test, SIZE, 250):
        right_plain += int((gated.plain_forward(x).argmax(1) == y).sum())
        out = gated(x, return_exits=True, profile="iso")
        right_gated += int((out.logits.argmax(1) == y).sum())
        flops += gated.costs.average(out.exits, gated.profile("iso").thresholds) * len(y)
        exits.append(out.exits)
    n = len(test.tensors[1])
    return {"plain_accuracy": right_plain / n, "iso_accuracy": right_gated / n,
            "plain_gflops": gated.costs.backbone / 1e9, "iso_gflops": flops / n / 1e9,
            "iso_exit_fractions": (torch.cat(exits).bincount(minlength=gated.num_gates + 1) / n).tolist()}


def npy_bodies(test: TensorDataset) -> list[bytes]:
    bodies = []
    for x, _ in TensorBatches(test, SIZE, 500):
        for image in x:
            out = io.BytesIO()
            np.save(out, image.numpy())
            bodies.append(out.getvalue())
    return bodies


async def open_loop(url: str, bodies: list[bytes], labels: list[int], rate: float, count: int, seed: int) -> dict:
    """``count`` requests with Poisson arrivals at ``rate``/s, each sent at its time whatever the others do."""
    import aiohttp

    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in range(count)]
    done: list[tuple[float, bool, int | None, int | None]] = []  # latency, answered, right, exit
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(i: int, due: float) -> None:
            try:
                async with session.post(url, data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "application/x-npy"}) as response:
                    reply = await response.json()
                    ok = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok, reply = False, None
            right = int(reply["class"] == labels[i % len(labels)]) if ok else None
            done.append((time.perf_counter() - due, ok, right, reply["exit"] if ok else None))

        start = due = time.perf_counter() + 0.05
        tasks = []
        for i, gap in enumerate(gaps):
            due += gap
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    latencies = sorted(lat for lat, ok, _, _ in done if ok)
    answered = len(latencies)
    return {"rate": rate, "requests": count, "answered": answered, "errors": count - answered,
            "offered": count / sum(gaps), "throughput": answered / elapsed,
            "p50_ms": quantile_ms(latencies, 0.5), "p99_ms": quantile_ms(latencies, 0.99),
            "accuracy": sum(r for _, ok, r, _ in done if ok) / max(answered, 1),
            "exits": [e for _, ok, _, e in done if ok]}


def quantile_ms(latencies: list[float], q: float) -> float:
    """The ``q`` quantile of sorted latencies in seconds, in ms (the nearest rank); inf when none was answered."""
    return latencies[max(0, math.ceil(q * len(latencies)) - 1)] * 1000 if latencies else math.inf


def keeps_up(row: dict) -> bool:
    return row["errors"] == 0 and row["throughput"] >= 0.9 * row["offered"]


def sustained(row: dict, bound_ms: float) -> bool:
    return keeps_up(row) and row["p99_ms"] <= bound_ms


def echo_app(folder: Path, gated: timm_dgate.GatedModel):
    """The same ingress in front of a deployment that answers at once without a model: what Serve itself costs."""
    from ray import serve

    from timm_dgate.serve.ingress import Ingress
    from timm_dgate.serve.spec import spec_of

    spec = spec_of(gated, str(folder.resolve()), "gated")

    @serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
    class Echo:
        async def __call__(self, x: torch.Tensor, policy) -> tuple[torch.Tensor, int]:
            return torch.zeros(spec.num_classes), spec.num_gates

        def stats(self) -> dict:
            return {}

    echo = Echo.bind()
    return Ingress.options(name="ingress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0}).bind(
        spec, "echo", echo, [echo])


def serve_shape(args: argparse.Namespace, folder: Path, gated, shape: str, bodies, labels) -> tuple[list[dict], dict]:
    from ray import serve

    from timm_dgate.serve import build_app

    threads = args.segment_threads if shape == "segments" else args.torch_threads
    app = echo_app(folder, gated) if shape == "echo" else build_app(
        folder, shape=shape, max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
        ray_actor_options={"num_cpus": 0}, torch_threads=threads)
    started = time.perf_counter()
    serve.run(app, name=shape, route_prefix=f"/{shape}")
    url = f"http://127.0.0.1:{args.port}/{shape}"
    print(f"{shape}: deployed in {time.perf_counter() - started:.0f} s", flush=True)
    asyncio.run(open_loop(url, bodies, labels, 20, 60, seed=99))  # warm-up
    rows, bound = [], args.p99_bounds_ms[0]
    for i, rate in enumerate(args.rates):
        row = asyncio.run(open_loop(url, bodies, labels, rate, args.requests, seed=i))
        row["exit_fractions"] = (torch.tensor(row.pop("exits") or [0]).bincount().float() / max(row["answered"], 1)
                                 ).tolist()
        row["sustained"] = sustained(row, bound)
        rows.append(row)
        print(f"  {rate:>6.0f}/s: p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  "
              f"{row['throughput']:6.1f}/s answered  errors {row['errors']}  "
              f"{'sustained' if row['sustained'] else 'not sustained'}", flush=True)
        if not keeps_up(row):
            break
    with urllib.request.urlopen(f"{url}/stats", timeout=60) as response:
        stats = json.loads(response.read())
    serve.delete(shape)
    return rows, stats


def best_rate(rows: list[dict], bound_ms: float) -> float:
    return max((r["rate"] for r in rows if sustained(r, bound_ms)), default=0.0)


def goals(results: dict[str, list[dict]], bounds_ms: list[float]) -> list[dict]:
    """Per p99 bound and gated shape: its highest sustained rate over the plain model's, and its p99 over the plain
    model's at the plain model's highest sustained rate."""
    plain = results.get("plain", [])
    out = []
    for bound in bounds_ms:
        plain_rate = best_rate(plain, bound)
        plain_p99 = next((r["p99_ms"] for r in plain if r["rate"] == plain_rate), math.nan)
        for shape in [s for s in results if s not in ("plain", "echo")]:
            rate = best_rate(results[shape], bound)
            p99 = next((r["p99_ms"] for r in results[shape] if r["rate"] == plain_rate), math.nan)
            rate_ratio = rate / plain_rate if plain_rate else (math.inf if rate else math.nan)
            p99_ratio = p99 / plain_p99 if plain_p99 else math.nan
            out.append({"bound_ms": bound, "shape": shape, "sustained_rate": rate, "plain_sustained_rate": plain_rate,
                        "rate_ratio": rate_ratio, "p99_at_plain_rate_ms": p99, "plain_p99_ms": plain_p99,
                        "p99_ratio": p99_ratio, "rate_goal_met": rate_ratio >= GOAL["rate_ratio"],
                        "p99_goal_met": p99_ratio <= GOAL["p99_ratio"]})
    return out


def markdown(report: dict) -> str:
    model = report["model"]
    lines = [
        "# Benchmark: serving on Ray Serve (per segment, whole, plain)", "",
        f"Generated by `{report['command']}` on {report['date']} ({report['machine']}; ray {report['ray']}, "
        f"torch {report['torch']}). Backbone: {report['backbone']}. Gates: the default kind (MLP, 128 hidden), fit "
        f"on {report['gate_images']} training images; profile `iso` calibrated on {report['val_images']} validation "
        "images (at most 0.1 point below the plain model there).", "",
        f"On {report['test_images']} test images: plain {100 * model['plain_accuracy']:.2f}% at "
        f"{model['plain_gflops']:.4f} GFLOPs; `iso` {100 * model['iso_accuracy']:.2f}% at {model['iso_gflops']:.4f} "
        f"GFLOPs, exits per gate {', '.join(f'{100 * f:.0f}%' for f in model['iso_exit_fractions'])} (last: the head).",
        "",
        f"Load: open loop on localhost over HTTP (`.npy` bodies), Poisson arrivals, {report['requests']} requests per "
        f"rate; latency from each request's scheduled time to its answer. Batching: `max_batch_size` "
        f"{report['max_batch_size']}, `batch_wait_timeout_s` {report['batch_wait_timeout_s']} in every shape; torch "
        f"threads: {report['torch_threads']['whole']} in the whole and plain replicas, "
        f"{report['torch_threads']['segments']} in each segment's; a local "
        "Ray with 2 CPUs, replicas reserving none. "
        f"Sustained: all answered, throughput (answered/s, first arrival to last answer) at least 90% of the rate "
        "offered (requests over the span of their Poisson arrival times), p99 at most "
        f"{report['p99_bounds_ms'][0]:.0f} ms (the `sustained` column; the goals below also at "
        f"{' and '.join(f'{b:.0f}' for b in report['p99_bounds_ms'][1:])} ms).",
        "", "| shape | rate (req/s) | offered | answered/s | p50 (ms) | p99 (ms) | errors | accuracy | sustained |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, rows in report["results"].items():
        for r in rows:
            accuracy = "-" if shape == "echo" else f"{100 * r['accuracy']:.1f}%"  # echo answers class 0
            lines.append(f"| {shape} | {r['rate']:.0f} | {r['offered']:.1f} | {r['throughput']:.1f} | "
                         f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {accuracy} "
                         f"| {'yes' if r['sustained'] else 'no'} |")
    lines += ["", "Mean rows per stage run over the whole run (`GET /stats`; `collected`: requests per collection of "
              "the whole-model replica):", ""]
    for shape, stats in report["deployment_stats"].items():
        means = [f"{stage} {b['mean']:.1f}" for d in stats.get("deployments", [])
                 for stage, b in d.get("batches", {}).items()]
        if means:
            lines.append(f"- {shape}: {', '.join(means)}")
    lines += ["", "## The goals", "", "| p99 bound | gated shape | highest sustained rate | vs plain | p99 at plain's "
              "highest sustained rate | vs plain's p99 | 2x the rate | half the p99 |",
              "|---|---|---|---|---|---|---|---|"]
    for g in report["goals"]:
        if not g["plain_sustained_rate"]:
            lines.append(f"| {g['bound_ms']:.0f} ms | {g['shape']} | {g['sustained_rate']:.0f}/s | the plain model "
                         f"sustains no rate | - | - | {'met' if g['rate_goal_met'] else 'missed'} | - |")
            continue
        lines.append(f"| {g['bound_ms']:.0f} ms | {g['shape']} | {g['sustained_rate']:.0f}/s | "
                     f"{g['rate_ratio']:.2f}x (plain {g['plain_sustained_rate']:.0f}/s) | "
                     f"{g['p99_at_plain_rate_ms']:.1f} ms | {g['p99_ratio']:.2f} (plain {g['plain_p99_ms']:.1f} ms) | "
                     f"{'met' if g['rate_goal_met'] else 'missed'} | {'met' if g['p99_goal_met'] else 'missed'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = arguments()
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        report["goals"] = goals(report["results"], report["p99_bounds_ms"])  # as this version judges them
        write(report, args.output)
        return
    started = time.perf_counter()
    splits = load_splits()
    model, described = backbone(args, splits)
    folder, gated = gated_folder(args, splits, model)
    test = first(splits.test, args.test_images)
    summary = accuracy(gated, test)
    print(f"backbone: {described}\n{summary}", flush=True)
    bodies, labels = npy_bodies(test), test.tensors[1].tolist()
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        served = {shape: serve_shape(args, folder, gated, shape, bodies, labels) for shape in args.shapes}
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {
        "command": shlex.join([".venv/bin/python", "benchmarks/serve.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(), "machine": machine(), "ray": ray.__version__,
        "torch": torch.__version__, "backbone": described, "gate_images": args.gate_images,
        "val_images": len(splits.val.tensors[1]), "test_images": len(labels), "model": summary,
        "requests": args.requests, "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s, "p99_bounds_ms": args.p99_bounds_ms,
        "results": {shape: rows for shape, (rows, _) in served.items()},
        "goals": goals({shape: rows for shape, (rows, _) in served.items()}, args.p99_bounds_ms),
        "deployment_stats": {shape: stats for shape, (_, stats) in served.items()},
        "torch_threads": {"plain": args.torch_threads, "whole": args.torch_threads, "segments": args.segment_threads},
        "seconds": round(time.perf_counter() - started),
    }
    if args.json:  # first: the markdown can be written again from it (--from-json)
        args.json.write_text(json.dumps(report, indent=1, default=float))
    write(report, args.output)
    print(f"took {report['seconds']} s")


def write(report: dict, output: Path | None) -> None:
    text = markdown(report)
    print(text)
    if output:
        output.write_text(text)


if __name__ == "__main__":
    main()
