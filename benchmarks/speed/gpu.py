"""The GPU benchmark of issue 27: plain and gated timm models served on a GPU, every way of running them side by side.

Why: timm models are served on GPUs, and there the gated model lost to ``torch.compile`` of the plain one
(docs/benchmarks-deploy-gpu.md). This times, per model, input size and dtype (fp32, or bf16 autocast), at
each batch size, in one run, with the variants interleaved (``timm_dgate.evaluation.timing``):

- ``plain eager``, ``plain compiled`` (``torch.compile(model)``, its defaults) and ``plain max-autotune``
  (``torch.compile(model, mode="max-autotune")``, static shapes; its autotuning takes minutes, so it runs for
  one model, input, dtype and batch only, in a child process with a time limit: ``--max-autotune``);
- ``gated eager``, ``gated compiled`` (``gated.compile()``), ``gated graphs`` (``gated.cuda_graphs()``: the
  segments replayed from CUDA graphs), ``gated compiled+graphs`` (``compile()`` then ``cuda_graphs()``),
  ``refill`` and ``refill graphs`` (``timm_dgate.deploy.refill.RefillExecutor``: every stage waits for a full
  batch of survivors, without and with CUDA graphs; only for models cut into a chain of stages);

under two exit distributions: ``measured``, the share of images per exit of a real calibrated profile
(``MEASURED_SHARES``), and ``half``, half of the images at gate 0 and the rest through the head (as
docs/benchmarks-deploy-gpu.md). Each becomes thresholds on the benchmark model's own gate scores by quantiles
(``share_thresholds``). Random weights and random images: the executors' speed depends on where samples exit,
not on what the weights learned.

Per row: images/s; the FLOPs ideal (the backbone's FLOPs over the average FLOPs of the row's exits); the time
ideal, the images/s the row's way of running would reach if cutting the batch at a gate cost nothing: the
same model timed with every image forced out at exit k, for each k, weighted by the row's shares of images
per exit; at batch 1 the p50 and p99 latency (each call synchronised). Results go to ``<out>/gpu-results.jsonl``
one JSON line per measurement as they are made (a run cut short keeps what it measured);
``--report`` writes the document and the JSON list from that file.

The run holds a time budget (``--budget-s``): models are measured in the order of ``--configs`` and what
does not fit is listed as skipped. benchmarks/gpu.sh runs this with the GPU tests; benchmarks/README.md says how.

    .venv/bin/python benchmarks/speed/gpu.py --device cuda --out runs/gpu
    .venv/bin/python benchmarks/speed/gpu.py --device cpu --quick --out /tmp/gpu-smoke       # smoke run, minutes
    .venv/bin/python benchmarks/speed/gpu.py --report runs/gpu/gpu-results.jsonl \
        --output docs/benchmarks-gpu.md --json docs/benchmarks-gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `benchmarks.*`

import timm_dgate
from benchmarks.common import machine, random_gated
from timm_dgate.core.policy import ExitPolicy
from timm_dgate.core.scores import exit_score
from timm_dgate.deploy.graphs import default_buckets
from timm_dgate.deploy.refill import RefillExecutor
from timm_dgate.errors import UntrainedHeadWarning
from timm_dgate.evaluation.timing import Run, interleaved

# Share of images leaving at each exit (gates 0, 1, 2, then the head) of a real calibrated profile: the MLP gates'
# `softmax iso` profile of the 40-epoch Fashion-MNIST resnet18, on its 10,000 test images (docs/benchmarks.md,
# section "Where each class exits: resnet18", table "MLP gates (CE): `softmax iso`", row **all**: 78.0% / 19.2% /
# 2.2% / 0.6%). A measured input, not a result. The converged resnet50's mlp iso profile publishes no shares per
# exit, only its FLOPs (0.0319 of 0.1637 GFLOPs: 80.5% saved, against 75% for these shares on resnet50), so it
# sends even more images out at gate 0 and these shares are on the cautious side for it. `--shares` overrides.
MEASURED_SHARES = (0.780, 0.192, 0.022, 0.006)
MEASURED_SOURCE = ("docs/benchmarks.md, Where each class exits: resnet18 (40 epochs), MLP gates (CE) `softmax iso`, "
                   "row all")
HALF_SHARES = (0.5, 0.0, 0.0, 0.5)  # gate 0 at the median of its scores, later gates closed (half_exit_thresholds)

PLAIN_MODES = ("plain eager", "plain compiled", "plain max-autotune")
GATED_MODES = ("gated eager", "gated compiled", "gated graphs", "gated compiled+graphs", "refill", "refill graphs")
MODES = PLAIN_MODES + GATED_MODES
# what each gated mode runs when every image is forced out at one exit (its time ideal)
KIND = {"gated eager": "eager", "gated compiled": "compiled", "gated graphs": "graphs",
        "gated compiled+graphs": "compiled+graphs", "refill": "eager", "refill graphs": "graphs"}
NEEDS_CUDA = ("gated graphs", "gated compiled+graphs", "refill graphs")
COMPILED = ("plain compiled", "gated compiled", "gated compiled+graphs")
DISTRIBUTIONS = ("measured", "half")
# the default run, most important first (the goals are on resnet50 at 224 px); 224 px: 3 channels and
# 1000 classes (ImageNet-style serving); 32 px: 1 channel and 10 classes, as docs/benchmarks-deploy-gpu.md
DEFAULT_CONFIGS = (
    "resnet50:224:bf16", "convnext_tiny:224:bf16", "deit_small_patch16_224:224:bf16", "resnet50:224:fp32",
    "resnet50:32:fp32", "convnext_atto:32:fp32", "convnext_tiny:224:fp32", "deit_small_patch16_224:224:fp32",
    "resnet50:32:bf16", "convnext_atto:32:bf16",
)
QUICK_CONFIGS = ("resnet18:32:fp32",)
GOAL = {"model": "resnet50", "input_size": 224, "batch": 256, "time_fraction": 0.8, "vs_compiled": 2.0}
RESULTS = "gpu-results.jsonl"
# seconds a step is expected to take before this run has measured one (the budget's first guesses)
FIRST_GUESS = {"compile": 90.0, "batch": {1: 20.0, 64: 15.0, 256: 15.0, 1024: 25.0}, "other batch": 15.0}
MIN_CONFIG_S = 40.0  # a config is not started with less than this left


# ---- configs and the run's record ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    model: str
    size: int
    dtype: str  # fp32 or bf16 (autocast)

    @classmethod
    def parse(cls, text: str) -> Config:
        model, size, dtype = text.split(":")
        if dtype not in ("fp32", "bf16"):
            raise argparse.ArgumentTypeError(f"{text}: dtype fp32 or bf16")
        return cls(model, int(size), dtype)

    @property
    def in_chans(self) -> int:
        return 3 if self.size >= 64 else 1

    @property
    def num_classes(self) -> int:
        return 1000 if self.size >= 64 else 10

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.in_chans, self.size, self.size)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {"img_size": self.size} if self.model.startswith(("vit", "deit")) else {}

    def key(self) -> dict[str, Any]:
        return {"model": self.model, "input_size": self.size, "in_chans": self.in_chans, "dtype": self.dtype}

    def __str__(self) -> str:
        return f"{self.model}:{self.size}:{self.dtype}"


def commit() -> str:
    """The commit measured: ``DGATE_COMMIT`` (the GPU machine gets a copy of the tree without .git), else git's."""
    if os.environ.get("DGATE_COMMIT"):
        return os.environ["DGATE_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return head + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


class Writer:
    """Appends one JSON line per record to the results file, flushed at once: a run cut short keeps its rows."""

    def __init__(self, path: Path, base: dict[str, Any]):
        self.path, self.base = path, base

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"kind": kind, **(self.base if kind == "row" else {}), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
        return record


@dataclass
class Budget:
    """The run's deadline, and what each step took so far (the guesses for the next ones)."""

    deadline: float
    compile_s: float = FIRST_GUESS["compile"]
    batch_s: dict[tuple[int, int], float] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def batch_guess(self, size: int, batch: int) -> float:
        if (size, batch) in self.batch_s:
            return self.batch_s[(size, batch)]
        guess = FIRST_GUESS["batch"].get(batch, FIRST_GUESS["other batch"])
        return guess if size >= 64 else guess / 2


# ---- thresholds from shares ---------------------------------------------------------------------------------------


def autocast_for(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.inference_mode()
def gate_scores(gated: timm_dgate.GatedModel, images: torch.Tensor, autocast: Callable,
                chunk: int) -> list[torch.Tensor]:
    """Every gate's exit score for every image (one full pass, in chunks), on the CPU as float."""
    parts: list[list[torch.Tensor]] = [[] for _ in range(gated.num_gates)]
    for x in images.split(chunk):
        with autocast():
            margins, _ = gated.forward_gates(x)
        for k, m in enumerate(margins):
            parts[k].append(exit_score(m.float(), gated.exit_score).cpu())
    return [torch.cat(p) for p in parts]


def share_thresholds(scores: Sequence[torch.Tensor], shares: Sequence[float]) -> tuple[float, ...]:
    """Thresholds under which ``shares[k]`` of the images leave at gate ``k`` (the rest at the head).

    Gate by gate: of the images still in, the ``round(shares[k] * n)`` with the highest scores leave, the
    threshold at the midpoint between the last one leaving and the first one staying (``half_exit_thresholds``'
    rule); a share of 0 closes the gate, and a gate that must let out everyone left opens fully.
    """
    n = len(scores[0])
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for k, share in enumerate(shares[: len(scores)]):
        count = round(share * n)
        alive = scores[k][remaining]
        if count == 0:
            thresholds.append(math.inf)
            continue
        if count >= len(alive):
            thresholds.append(-math.inf)
            remaining[:] = False
            continue
        ordered = alive.sort(descending=True).values
        threshold = float((ordered[count - 1] + ordered[count]) / 2)
        thresholds.append(threshold)
        remaining &= ~(scores[k] >= threshold)
    return tuple(thresholds) + (math.inf,) * (len(scores) - len(thresholds))


def forced(num_gates: int, k: int, score: str) -> ExitPolicy:
    """Every image out at exit ``k`` (``num_gates``: the head, every gate closed)."""
    return ExitPolicy(tuple(-math.inf if j == k else math.inf for j in range(num_gates)), score)


# ---- what is timed ------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """One config's models, images, exit policies and the instances each mode runs."""

    config: Config
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    plain: torch.nn.Module
    gated: timm_dgate.GatedModel
    images: torch.Tensor
    policies: dict[str, ExitPolicy]
    exits: dict[str, torch.Tensor]  # per distribution, every image's exit (eager gated model)
    kinds: dict[str, Any] = field(default_factory=dict)  # eager / compiled / graphs / compiled+graphs -> gated model
    plains: dict[str, Any] = field(default_factory=dict)  # plain eager / plain compiled -> model
    unavailable: dict[str, str] = field(default_factory=dict)  # mode -> why it has no rows
    segment_graphs: dict[str, Any] = field(default_factory=dict)  # kind -> what cuda_graphs() returned
    stages_problem: str | None = None

    @property
    def num_gates(self) -> int:
        return self.gated.num_gates


def under(autocast: Callable, fn: Callable[[torch.Tensor], Any]) -> Run:
    def run(x: torch.Tensor) -> Any:
        with autocast():
            return fn(x)
    return run


def gated_run(model: timm_dgate.GatedModel, policy: ExitPolicy) -> Callable[[torch.Tensor], Any]:
    return lambda x: model(x, profile=policy)


def refill_run(executor: RefillExecutor, batch: int, policy: ExitPolicy) -> Callable[[torch.Tensor], Any]:
    """All images of a pass through ``executor``, ``batch`` at a time, then flushed; results in order."""

    def run(x: torch.Tensor) -> list:
        tickets = []
        for part in x.split(batch):
            tickets.append(executor.submit(part, policy))
            executor.run_full()
        executor.flush()
        return [executor.pop(t) for t in tickets]

    return run


def short(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def prepare(config: Config, args: argparse.Namespace, writer: Writer) -> Setup:
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedHeadWarning)  # random weights on purpose
        plain, gated = random_gated(config.model, config.input_size, args.device, num_classes=config.num_classes,
                                    **config.model_kwargs)
    count = args.images if args.images else (2048 if config.size >= 64 else 4096)
    images = torch.randn(count, *config.input_size, generator=torch.Generator().manual_seed(1)).to(args.device)
    autocast = autocast_for(args.device, config.dtype)
    scores = gate_scores(gated, images, autocast, chunk=256)
    policies, exits = {}, {}
    for name, shares in (("measured", args.shares), ("half", HALF_SHARES)):
        policies[name] = ExitPolicy(share_thresholds(scores, shares), gated.exit_score)
        with torch.inference_mode(), autocast():
            exits[name] = torch.cat([gated(x, return_exits=True, profile=policies[name]).exits.cpu()
                                     for x in images.split(256)])
    setup = Setup(config, args.device, autocast, plain, gated, images, policies, exits)
    setup.kinds["eager"] = gated
    setup.plains["plain eager"] = plain
    try:
        RefillExecutor(gated, 2)
    except Exception as error:  # ExportError: the forward is not a chain of stages (a ViT)
        setup.stages_problem = short(error)
    writer.write("phase", **config.key(), phase="build, thresholds and exits", seconds=time.monotonic() - start)
    return setup


def add_compiled(setup: Setup, args: argparse.Namespace, writer: Writer, budget: Budget) -> None:
    """``torch.compile(plain)`` and ``gated.compile()``, compiled now at batch 1 and 2 (the static and the dynamic
    graphs every later batch size reuses), so compiling stays out of the timed passes. Copies are made outside
    ``inference_mode`` (their parameters stay ordinary tensors); every call runs inside it, as the timed ones do."""
    wanted = [m for m in ("plain compiled", "gated compiled", "gated compiled+graphs") if m in args.modes]
    if not wanted:
        return
    if budget.left() < budget.compile_s + 30:
        for mode in wanted:
            setup.unavailable[mode] = (f"skipped: time budget (compiling takes about {budget.compile_s:.0f} s, "
                                       f"{budget.left():.0f} s were left)")
        return
    start = time.monotonic()
    closed = ExitPolicy.closed(setup.num_gates, setup.gated.exit_score)
    if "plain compiled" in args.modes:
        try:
            model = torch.compile(copy.deepcopy(setup.plain), backend=args.backend)
            for n in (1, 2):
                with torch.inference_mode(), setup.autocast():
                    model(setup.images[:n])
            setup.plains["plain compiled"] = model
        except Exception as error:
            setup.unavailable["plain compiled"] = short(error)
    writer.write("phase", **setup.config.key(), phase="compile plain", seconds=time.monotonic() - start)
    middle = time.monotonic()
    if "gated compiled" in args.modes or "gated compiled+graphs" in args.modes:
        try:
            model = copy.deepcopy(setup.gated)
            model.compile(backend=args.backend)
            for n in (1, 2):
                with torch.inference_mode(), setup.autocast():
                    model(setup.images[:n], profile=closed)  # every segment, at both graphs
            setup.kinds["compiled"] = model
        except Exception as error:
            setup.unavailable["gated compiled"] = setup.unavailable["gated compiled+graphs"] = short(error)
    writer.write("phase", **setup.config.key(), phase="compile gated", seconds=time.monotonic() - middle)
    budget.compile_s = time.monotonic() - start


def add_graphs(setup: Setup, args: argparse.Namespace, writer: Writer, buckets: list[int]) -> None:
    """``gated.cuda_graphs(buckets)`` on a copy of the eager and of the compiled model (captured lazily)."""
    if setup.device.type != "cuda":
        for mode in NEEDS_CUDA:
            setup.unavailable.setdefault(mode, "needs CUDA")
        return
    start = time.monotonic()
    if "gated graphs" in args.modes:
        try:
            model = copy.deepcopy(setup.gated)
            setup.segment_graphs["graphs"] = model.cuda_graphs(buckets)
            setup.kinds["graphs"] = model
        except Exception as error:
            setup.unavailable["gated graphs"] = short(error)
    if "gated compiled+graphs" in args.modes and "compiled" in setup.kinds:
        try:
            model = copy.deepcopy(setup.kinds["compiled"])
            # CUDA graphs capture under autocast(cache_enabled=False), which dynamo guards on: compile that variant
            # here, outside the capture, so nothing compiles while a stream is capturing
            closed = ExitPolicy.closed(setup.num_gates, setup.gated.exit_score)
            cast = torch.bfloat16 if setup.config.dtype == "bf16" else torch.get_autocast_dtype("cuda")
            for n in (1, 2):
                with torch.inference_mode(), torch.autocast("cuda", dtype=cast, enabled=setup.config.dtype == "bf16",
                                                            cache_enabled=False):
                    model(setup.images[:n], profile=closed)
            setup.segment_graphs["compiled+graphs"] = model.cuda_graphs(buckets)
            setup.kinds["compiled+graphs"] = model
        except Exception as error:
            setup.unavailable["gated compiled+graphs"] = short(error)
    writer.write("phase", **setup.config.key(), phase="graphs set up", seconds=time.monotonic() - start)


def mode_runs(setup: Setup, args: argparse.Namespace, batch: int,
              executors: dict[str, RefillExecutor]) -> dict[tuple[str, str | None], Callable]:
    """(mode, distribution) -> what one call runs: one batch, or for the refill modes a whole pass."""
    runs: dict[tuple[str, str | None], Callable] = {}
    for mode, model in setup.plains.items():
        runs[(mode, None)] = under(setup.autocast, model)
    for mode in GATED_MODES:
        if mode not in args.modes or mode in setup.unavailable:
            continue
        for dist in DISTRIBUTIONS:
            policy = setup.policies[dist]
            if mode.startswith("refill"):
                if mode in executors:
                    runs[(mode, dist)] = under(setup.autocast, refill_run(executors[mode], batch, policy))
            elif KIND[mode] in setup.kinds:
                runs[(mode, dist)] = under(setup.autocast, gated_run(setup.kinds[KIND[mode]], policy))
    return runs


def forced_runs(setup: Setup, args: argparse.Namespace) -> dict[tuple[str, int], Callable]:
    """(kind, exit) -> one call with every image forced out at that exit, for each kind a gated mode uses."""
    kinds = {KIND[m] for m in GATED_MODES if m in args.modes and m not in setup.unavailable}
    return {(kind, k): under(setup.autocast, gated_run(setup.kinds[kind], forced(setup.num_gates, k,
                                                                                setup.gated.exit_score)))
            for kind in sorted(kinds) if kind in setup.kinds for k in range(setup.num_gates + 1)}


def refill_executors(setup: Setup, args: argparse.Namespace, batch: int) -> dict[str, RefillExecutor]:
    executors = {}
    for mode, graphs in (("refill", False), ("refill graphs", True)):
        if mode not in args.modes or mode in setup.unavailable:
            continue
        if setup.stages_problem:
            setup.unavailable[mode] = setup.stages_problem
            continue
        try:
            executors[mode] = RefillExecutor(setup.gated, batch, cuda_graphs=graphs)
        except Exception as error:
            setup.unavailable[mode] = short(error)
    return executors


def check_each(runs: dict, inputs: dict, failed: dict[Any, str]) -> dict:
    """Call each run once (captures and lazy set-up happen here); the ones that fail are left out with why."""
    kept = {}
    for key, run in runs.items():
        try:
            with torch.inference_mode():
                run(inputs[key])
            kept[key] = run
        except Exception as error:
            failed[key] = short(error)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    return kept


def shares_of(exits: torch.Tensor, num_exits: int) -> list[float]:
    return (torch.bincount(exits, minlength=num_exits).float() / max(len(exits), 1)).tolist()


def flops_ideal(setup: Setup, exits: torch.Tensor, policy: ExitPolicy) -> float:
    costs = setup.gated.costs
    return costs.backbone / costs.average(exits, policy.thresholds)


def time_ideal(per_image: dict[int, float] | None, shares: Sequence[float]) -> float | None:
    """Images/s with each share of images costing what it costs when the whole batch leaves at its exit."""
    if not per_image or any(k not in per_image for k, s in enumerate(shares) if s > 0):
        return None
    return 1.0 / sum(s * per_image[k] for k, s in enumerate(shares) if s > 0)


@torch.inference_mode()
def latencies(runs: dict[Any, Callable], images: torch.Tensor, calls: dict[Any, int]) -> dict[Any, list[float]]:
    """Per run, the seconds of each call on one image, the device synchronised after each; runs take turns."""
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    for run in runs.values():  # warm-up
        for i in range(3):
            run(images[i : i + 1])
    sync()
    seconds: dict[Any, list[float]] = {key: [] for key in runs}
    order = list(runs)
    for i in range(max(calls.values(), default=0)):
        for key in order if i % 2 == 0 else reversed(order):
            if i >= calls[key]:
                continue
            x = images[i : i + 1]
            start = time.perf_counter()
            runs[key](x)
            sync()
            seconds[key].append(time.perf_counter() - start)
    return seconds


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def measure_batch(setup: Setup, args: argparse.Namespace, writer: Writer, batch: int) -> None:
    """Every mode at ``batch``, under both distributions, and the forced exits of each kind; one row each."""
    config, num_exits = setup.config, setup.num_gates + 1
    executors = refill_executors(setup, args, batch)
    runs = mode_runs(setup, args, batch, executors)
    forced_by = forced_runs(setup, args)
    failed: dict[Any, str] = {}
    notes: dict[tuple[str, str | None], str] = {}
    if batch == 1:
        pool = setup.images[: args.latency_calls]
        singles = {key: pool[:1] for key in [*runs, *forced_by]}
        runs = check_each(runs, singles, failed)
        forced_by = check_each(forced_by, singles, failed)
        forced_calls = max(8, args.latency_calls // 4)
        calls = {**{key: args.latency_calls for key in runs}, **{key: forced_calls for key in forced_by}}
        seconds = latencies({**runs, **forced_by}, pool, calls)
        per_image = {key: statistics.fmean(s) for key, s in seconds.items()}
        rate = {key: 1.0 / per_image[key] for key in runs}
        lat = {key: (1000 * statistics.median(seconds[key]), 1000 * percentile(seconds[key], 0.99)) for key in runs}
        timed_images = pool
    else:
        count = min(len(setup.images), max(len(setup.images) // 2, 2 * batch))
        timed_images = setup.images[:count]
        batches = list(timed_images.split(batch))
        half = batches[: max(1, len(batches) // 2)]
        inputs = {key: ([timed_images] if key[0].startswith("refill") else batches) for key in runs}
        inputs.update({key: half for key in forced_by})
        runs = check_each(runs, {key: inputs[key][0] for key in runs}, failed)
        forced_by = check_each(forced_by, {key: inputs[key][0] for key in forced_by}, failed)
        timed = {key: (run, inputs[key]) for key, run in {**runs, **forced_by}.items()}
        seconds = interleaved(timed, args.repeats)
        per_image = {key: statistics.median(s) / sum(len(b) for b in inputs[key]) for key, s in seconds.items()}
        rate = {key: 1.0 / per_image[key] for key in runs}
        lat = {}
    kind_time: dict[str, dict[int, float]] = {}
    for (kind, k), t in per_image.items():
        if (kind, k) in forced_by:
            kind_time.setdefault(kind, {})[k] = t
    for mode, executor in executors.items():  # what the stage graphs hold (the executor's own graphs, if it says)
        steps = (*getattr(executor, "_steps", ()), getattr(executor, "_head", None))
        held = sum(getattr(s, "memory_bytes", 0) for s in steps)
        if held:
            notes[(mode, None)] = f"stage graphs {held / 2**20:.0f} MiB"
    exits_here = {d: setup.exits[d][: len(timed_images)] for d in DISTRIBUTIONS}
    for mode in MODES:
        if mode not in args.modes or mode == "plain max-autotune":
            continue
        for dist in ((None,) if mode in PLAIN_MODES else DISTRIBUTIONS):
            key = (mode, dist)
            base = {**config.key(), "batch": batch, "mode": mode, "exits": dist}
            if dist is not None:
                shares = shares_of(exits_here[dist], num_exits)
                base.update(exit_shares=[round(s, 4) for s in shares],
                            flops_ideal=flops_ideal(setup, exits_here[dist], setup.policies[dist]))
            if key in rate:
                row = {**base, "status": "ok", "images_per_s": rate[key]}
                if dist is not None:
                    ideal = time_ideal(kind_time.get(KIND[mode]), base["exit_shares"])
                    row.update(time_ideal=ideal, time_ideal_fraction=rate[key] / ideal if ideal else None)
                if key in lat:
                    row.update(p50_ms=lat[key][0], p99_ms=lat[key][1])
                extra = [notes.get((mode, None), "")]
                if mode.startswith("gated") and KIND[mode] in setup.segment_graphs:
                    graphs = setup.segment_graphs[KIND[mode]]
                    extra.append(f"{graphs.num_graphs} graphs, {graphs.memory_bytes / 2**20:.0f} MiB so far")
                row["notes"] = "; ".join(e for e in extra if e)
                writer.write("row", **row)
            else:
                reason = setup.unavailable.get(mode) or failed.get(key) or "not run"
                writer.write("row", **base, status="skipped" if reason.startswith("skipped") else "n/a",
                             notes=reason)
    summary = {f"{m}{'/' + d if d else ''}": round(r) for (m, d), r in rate.items()}
    print(config, "batch", batch, summary, flush=True)
    del executors
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()


def skip_rows(writer: Writer, config: Config, batches: Sequence[int], modes: Sequence[str], reason: str) -> None:
    for batch in batches:
        for mode in modes:
            if mode == "plain max-autotune":
                continue
            for dist in ((None,) if mode in PLAIN_MODES else DISTRIBUTIONS):
                writer.write("row", **config.key(), batch=batch, mode=mode, exits=dist,
                             status="skipped" if reason.startswith("skipped") else "n/a", notes=reason)


def measure_config(config: Config, args: argparse.Namespace, writer: Writer, budget: Budget) -> None:
    start = time.monotonic()
    torch._dynamo.reset()
    setup = prepare(config, args, writer)
    for mode in args.modes:
        if mode in NEEDS_CUDA and args.device.type != "cuda":
            setup.unavailable[mode] = "needs CUDA"
    add_compiled(setup, args, writer, budget)
    cap = min(max(args.batch_sizes), args.graph_bucket_cap if config.size >= 64 else max(args.batch_sizes))
    add_graphs(setup, args, writer, default_buckets(cap))
    for index, batch in enumerate(args.batch_sizes):
        guess = budget.batch_guess(config.size, batch)
        if budget.left() < guess:
            skip_rows(writer, config, args.batch_sizes[index:], args.modes,
                      f"skipped: time budget (about {guess:.0f} s needed, {budget.left():.0f} s left)")
            break
        began = time.monotonic()
        try:
            measure_batch(setup, args, writer, batch)
        except Exception as error:  # one batch size failing leaves the others
            print(config, "batch", batch, "failed:", short(error), flush=True)
            skip_rows(writer, config, [batch], args.modes, f"failed: {short(error)}")
        budget.batch_s[(config.size, batch)] = time.monotonic() - began
        writer.write("phase", **config.key(), phase=f"timing batch {batch}", seconds=time.monotonic() - began)
    graphs = {k: round(v.memory_bytes / 2**20) for k, v in setup.segment_graphs.items()}
    writer.write("config", **config.key(), seconds=time.monotonic() - start, graphs_mib=graphs,
                 thresholds={d: [str(t) for t in p.thresholds] for d, p in setup.policies.items()},
                 unavailable=setup.unavailable)
    del setup
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()


# ---- plain max-autotune, in a child process with a time limit -----------------------------------------------------


def autotune_child(args: argparse.Namespace) -> None:
    """Plain eager and ``torch.compile(mode="max-autotune")`` at one static batch, interleaved; rows appended."""
    config, batch = args.autotune_config, args.autotune_batch
    writer = Writer(args.out / RESULTS, run_base(args))
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedHeadWarning)
        plain, _ = random_gated(config.model, config.input_size, args.device, num_classes=config.num_classes,
                                **config.model_kwargs)
    count = args.images if args.images else (2048 if config.size >= 64 else 4096)
    images = torch.randn(min(count, max(count // 2, 2 * batch)), *config.input_size,
                         generator=torch.Generator().manual_seed(1)).to(args.device)
    batches = list(images.split(batch))[: len(images) // batch] or [images[:batch]]
    autocast = autocast_for(args.device, config.dtype)
    tuned = torch.compile(copy.deepcopy(plain), mode="max-autotune", dynamic=False)
    with torch.inference_mode(), autocast():
        tuned(batches[0])
    compile_s = time.monotonic() - start
    writer.write("phase", **config.key(), phase="compile plain max-autotune (child)", seconds=compile_s)
    seconds = interleaved({"eager": (under(autocast, plain), batches), "tuned": (under(autocast, tuned), batches)},
                          args.repeats)
    n = sum(len(b) for b in batches)
    eager_rate = n / statistics.median(seconds["eager"])
    writer.write("row", **config.key(), batch=batch, mode="plain max-autotune", exits=None, status="ok",
                 images_per_s=n / statistics.median(seconds["tuned"]),
                 notes=f"own process, static batch {batch}, compiled in {compile_s:.0f} s; plain eager there "
                       f"{eager_rate:.0f} images/s")


def die_with_parent() -> None:
    """In the child, before it starts: the kernel sends it SIGKILL when its parent dies (Linux; elsewhere nothing)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_autotune(args: argparse.Namespace, writer: Writer, budget: Budget) -> None:
    config, batch = args.autotune_config, args.autotune_batch
    limit = min(args.autotune_timeout_s, budget.left() - 20)
    base = {**config.key(), "batch": batch, "mode": "plain max-autotune", "exits": None}
    if limit < 30:
        writer.write("row", **base, status="skipped", notes=f"skipped: time budget ({budget.left():.0f} s left)")
        return
    command = [sys.executable, str(Path(__file__).resolve()), "--autotune-child", str(config), str(batch),
               "--device", str(args.device), "--out", str(args.out), "--repeats", str(args.repeats)]
    if args.images:
        command += ["--images", str(args.images)]
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    start = time.monotonic()
    # its own session, so a time-out kills its compile workers with it; and it dies if this process is killed
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent)
    try:
        code = child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        writer.write("row", **base, status="n/a",
                     notes=f"max-autotune did not compile and time within {limit:.0f} s (killed)")
        code = None
    if code:
        writer.write("row", **base, status="n/a", notes=f"max-autotune child failed (exit {code}); see the log")
    writer.write("phase", **config.key(), phase="plain max-autotune child", seconds=time.monotonic() - start)


# ---- the run ------------------------------------------------------------------------------------------------------


def run_base(args: argparse.Namespace) -> dict[str, Any]:
    return {"device": device_name(args.device), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "commit": commit()}


def run(args: argparse.Namespace) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RESULTS
    path.write_text("")
    base = run_base(args)
    writer = Writer(path, base)
    for name in ("cache_size_limit", "recompile_limit"):  # several dtypes and copies compile the same code here
        if isinstance(getattr(torch._dynamo.config, name, None), int):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    writer.write("run", **base, machine=machine(), quick=args.quick, budget_s=args.budget_s,
                 command=shlex.join(["python", *sys.argv]), shares=list(args.shares),
                 shares_source=MEASURED_SOURCE if tuple(args.shares) == MEASURED_SHARES else "--shares",
                 configs=[str(c) for c in args.configs], batch_sizes=args.batch_sizes, modes=args.modes,
                 repeats=args.repeats, latency_calls=args.latency_calls, backend=args.backend,
                 graph_bucket_cap=args.graph_bucket_cap,
                 max_autotune=f"{args.autotune_config}:{args.autotune_batch}" if args.autotune_config else None)
    budget = Budget(time.monotonic() + args.budget_s)
    for config in args.configs:
        if budget.left() < MIN_CONFIG_S:
            skip_rows(writer, config, args.batch_sizes, args.modes,
                      f"skipped: time budget ({budget.left():.0f} s left of {args.budget_s:.0f})")
            writer.write("config", **config.key(), seconds=0.0, skipped=True)
            continue
        try:
            measure_config(config, args, writer, budget)
        except Exception as error:
            print(config, "failed:", short(error), flush=True)
            writer.write("config", **config.key(), seconds=0.0, failed=short(error))
        if args.autotune_config == config:
            run_autotune(args, writer, budget)
    if args.autotune_config and args.autotune_config not in args.configs:
        run_autotune(args, writer, budget)
    print(f"results: {path}", flush=True)
    return path


# ---- the report ---------------------------------------------------------------------------------------------------


def load(path: Path) -> tuple[dict, list[dict], list[dict], list[dict]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    runs = [r for r in records if r["kind"] == "run"]
    if not runs:
        raise SystemExit(f"{path}: no run record (is this a gpu-results.jsonl?)")
    rows = [r for r in records if r["kind"] == "row"]
    # a later row for the same measurement (a rerun appended) wins
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["model"], r["input_size"], r["dtype"], r["batch"], r["mode"], r["exits"])] = r
    phases = [r for r in records if r["kind"] == "phase"]
    configs = [r for r in records if r["kind"] == "config"]
    return runs[0], list(latest.values()), phases, configs


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def best(rows: list[dict], modes: Sequence[str]) -> dict | None:
    ok = [r for r in rows if r["mode"] in modes and r["status"] == "ok"]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else None


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, each met, missed or not measured, per dtype of the goal's model and input."""
    lines = []
    goal_rows = [r for r in rows if r["model"] == GOAL["model"] and r["input_size"] == GOAL["input_size"]]
    for dtype in sorted({r["dtype"] for r in goal_rows}):
        mine = [r for r in goal_rows if r["dtype"] == dtype]
        at = [r for r in mine if r["batch"] == GOAL["batch"]]
        gated = best([r for r in at if r["exits"] == "measured"], GATED_MODES)
        compiled = best(at, ("plain compiled", "plain max-autotune"))
        label = f"{GOAL['model']} {GOAL['input_size']} px {dtype}, batch {GOAL['batch']}, measured exits"
        if gated is None:
            lines.append(f"- {label}: **not measured**.")
        else:
            fraction = gated.get("time_ideal_fraction")
            verdict = "not measured" if fraction is None else ("met" if fraction >= GOAL["time_fraction"] else
                                                               "**missed**")
            lines.append(f"- {label}: the best gated mode, `{gated['mode']}`, reaches "
                         + (f"{fraction:.2f}" if fraction is not None else "?")
                         + f" of its time ideal (goal {GOAL['time_fraction']}): {verdict}.")
            if compiled is None:
                lines.append(f"- {label}: no compiled plain mode measured: the {GOAL['vs_compiled']}x goal is "
                             "**not measured**.")
            else:
                ratio = gated["images_per_s"] / compiled["images_per_s"]
                missing = [m for m in ("plain compiled", "plain max-autotune")
                           if not any(r["mode"] == m and r["status"] == "ok" for r in at)]
                lines.append(f"- {label}: `{gated['mode']}` runs {ratio:.2f}x the images/s of the best compiled "
                             f"plain mode measured, `{compiled['mode']}` (goal {GOAL['vs_compiled']}x): "
                             f"{'met' if ratio >= GOAL['vs_compiled'] else '**missed**'}"
                             + (f" ({', '.join(missing)} not measured)" if missing else "") + ".")
        one = [r for r in mine if r["batch"] == 1]
        gated_one = [r for r in one if r["mode"] in GATED_MODES and r["exits"] == "measured" and r.get("p50_ms")]
        plain_one = next((r for r in one if r["mode"] == "plain compiled" and r.get("p50_ms")), None)
        label1 = f"{GOAL['model']} {GOAL['input_size']} px {dtype}, batch 1, measured exits"
        if not gated_one or plain_one is None:
            lines.append(f"- {label1}: p50 latency against compiled plain **not measured**.")
        else:
            fastest = min(gated_one, key=lambda r: r["p50_ms"])
            met = fastest["p50_ms"] <= plain_one["p50_ms"]
            lines.append(f"- {label1}: the lowest gated p50, `{fastest['mode']}`, {fastest['p50_ms']:.2f} ms against "
                         f"{plain_one['p50_ms']:.2f} ms for `plain compiled`: {'met' if met else '**missed**'}.")
    slower = []
    for r in rows:
        if r["mode"] not in GATED_MODES or r["status"] != "ok":
            continue
        plain = next((p for p in rows if p["mode"] == "plain eager" and p["status"] == "ok"
                      and all(p[k] == r[k] for k in ("model", "input_size", "dtype", "batch"))), None)
        if plain and r["images_per_s"] < plain["images_per_s"]:
            slower.append(f"{r['model']} {r['input_size']} px {r['dtype']} batch {r['batch']} `{r['mode']}` "
                          f"({r['exits']}: {r['images_per_s'] / plain['images_per_s']:.2f}x)")
    measured = sum(r["mode"] in GATED_MODES and r["status"] == "ok" for r in rows)
    if slower:
        lines.append(f"- No gated mode slower than plain eager anywhere: **missed** in {len(slower)} of {measured} "
                     f"gated rows: {'; '.join(slower)}.")
    else:
        lines.append(f"- No gated mode slower than plain eager anywhere: met in all {measured} gated rows measured.")
    return lines


def cell(row: dict | None, plain: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return "skipped" if row["status"] == "skipped" else "n/a"
    text = fmt_rate(row["images_per_s"])
    parts = []
    if row["mode"] in GATED_MODES and plain and plain["status"] == "ok":
        parts.append(f"{row['images_per_s'] / plain['images_per_s']:.2f}x")
    if row.get("time_ideal_fraction") is not None:
        parts.append(f"{row['time_ideal_fraction']:.2f}")
    if parts:
        text += f" ({', '.join(parts)})"
    if row.get("p50_ms") is not None:
        text += f"<br>{row['p50_ms']:.2f} / {row['p99_ms']:.2f} ms"
    return text


def config_section(rows: list[dict], model: str, size: int, dtype: str, batches: list[int]) -> list[str]:
    mine = [r for r in rows if (r["model"], r["input_size"], r["dtype"]) == (model, size, dtype)]
    chans = mine[0].get("in_chans", 3)
    lines = [f"## {model}, {chans}x{size}x{size}, {dtype}", ""]
    if all(r["status"] == "skipped" for r in mine):
        return [*lines, f"Not measured: {mine[0]['notes']}.", ""]
    reasons: dict[str, list[str]] = {}
    for dist in DISTRIBUTIONS:
        dist_rows = [r for r in mine if r["exits"] in (None, dist)]
        shares = next((r["exit_shares"] for r in dist_rows if r.get("exit_shares") and r["batch"] != 1), None)
        title = "measured exit distribution" if dist == "measured" else "half of the images at gate 0"
        share_text = f" (share of images per exit: {' / '.join(f'{s:.1%}' for s in shares)})" if shares else ""
        lines += [f"### {title}{share_text}", "",
                  "| mode | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---" * (len(batches) + 1) + "|"]
        ideals = []
        for b in batches:
            r = next((r for r in dist_rows if r["batch"] == b and r.get("flops_ideal")), None)
            ideals.append(f"{r['flops_ideal']:.2f}x" if r else "")
        lines.append("| *FLOPs ideal* | " + " | ".join(ideals) + " |")
        for mode in MODES:
            by_batch = {r["batch"]: r for r in dist_rows if r["mode"] == mode}
            if not by_batch:
                continue
            cells = []
            for b in batches:
                plain = next((r for r in mine if r["batch"] == b and r["mode"] == "plain eager"), None)
                cells.append(cell(by_batch.get(b), plain))
                row = by_batch.get(b)
                if row and row["status"] != "ok":
                    reasons.setdefault(f"`{mode}`: {row['notes']}", []).append(str(b))
            lines.append(f"| `{mode}` | " + " | ".join(cells) + " |")
        lines.append("")
    if reasons:
        lines += ["Not measured: " + "; ".join(f"{why} (batch {', '.join(sorted(set(bs), key=int))})"
                                              for why, bs in reasons.items()) + ".", ""]
    noted = {}  # per mode, the note of its largest batch (graph memory grows with the batches run)
    for r in sorted(mine, key=lambda r: r["batch"]):
        if r["status"] == "ok" and r.get("notes"):
            noted[r["mode"]] = f"`{r['mode']}` (batch {r['batch']}): {r['notes']}"
    if noted:
        lines += ["Notes: " + "; ".join(noted[m] for m in MODES if m in noted) + ".", ""]
    return lines


def report(path: Path, command: str) -> tuple[str, list[dict]]:
    run_record, rows, phases, configs = load(path)
    batches = sorted({r["batch"] for r in rows})
    order = list(dict.fromkeys((r["model"], r["input_size"], r["dtype"]) for r in rows))
    quick = " (a CPU smoke run: its numbers say nothing about a GPU)" if run_record.get("quick") else ""
    shares = run_record["shares"]
    lines = [
        f"# GPU benchmark: plain and gated timm models, every way of running them ({run_record['device']}){quick}",
        "",
        "Generated by `benchmarks/speed/gpu.py --report` from what `benchmarks/gpu.sh` wrote (issue 27). Random "
        "weights and random images (the executors' speed depends on where samples exit, not on what the weights "
        "learned); each model wrapped with its default gates. Two exit distributions, each turned into "
        "thresholds on the model's own gate scores over the benchmark images by quantiles: *measured*, the "
        "share of images per exit (gates, then head) of a real calibrated profile, "
        f"{' / '.join(f'{s:.1%}' for s in shares)} ({run_record['shares_source']}); *half*, half of the images "
        "at gate 0 and the rest through the head (docs/benchmarks-deploy-gpu.md's setting). bf16: "
        "`torch.autocast` around every call; fp32: torch's defaults (TF32 for cuDNN convolutions, not for matmuls). "
        "NCHW layout, `torch.inference_mode()`.",
        "",
        "Modes: `plain eager`; `plain compiled`, `torch.compile(model)` with its defaults (static at the first "
        "batch size, then a dynamic batch); `plain max-autotune`, `torch.compile(model, mode=\"max-autotune\")` at "
        "one static batch, in a process of its own with a time limit (its autotuning takes minutes); `gated "
        "eager`; `gated compiled`, `gated.compile()`; `gated graphs`, `gated.cuda_graphs()` (segments replayed "
        "from CUDA graphs captured per power-of-two bucket"
        + (f", at most {run_record['graph_bucket_cap']} rows at 224 px; larger batches run in pieces"
           if run_record.get("graph_bucket_cap") else "")
        + "); `gated compiled+graphs`, `compile()` then `cuda_graphs()`; `refill` and `refill graphs`, "
        "`timm_dgate.deploy.refill.RefillExecutor` with the batch size as its stage batch (every stage waits "
        "for a full batch of survivors of several input batches; flushed at the end of each pass), only for "
        "models whose forward is a chain of stages.",
        "",
        f"Each cell: images/s (speed-up over `plain eager` at that batch; fraction of the row's *time ideal*). "
        f"Batch 1: images/s from the mean latency, then p50 / p99 latency over {run_record['latency_calls']} "
        f"single-image calls, the device synchronised after each, variants taking turns. Larger batches: "
        f"{run_record['repeats']} passes per variant, all variants interleaved (`timm_dgate.evaluation.timing`), "
        "medians. The *FLOPs ideal* is the backbone's FLOPs over the average FLOPs of the exits taken (gates "
        "included). The *time ideal* is the images/s that way of running would reach if cutting the batch at a "
        "gate cost nothing: the same model timed with the whole batch forced out at each exit in turn, weighted "
        "by the row's shares of images per exit (the refill rows use the eager and graphs times).",
        "",
        "## Goals (issue 27)",
        "",
        *goals(rows),
        "",
    ]
    tests = path.parent / "pytest-gpu.txt"
    if tests.is_file():
        text = [line for line in tests.read_text().splitlines() if line.strip()]
        if text:
            lines += [f"GPU tests (`pytest -m gpu`, in the same session): {text[-1].strip('= ')}.", ""]
    for model, size, dtype in order:
        lines += config_section(rows, model, size, dtype, batches)
    if phases:
        lines += ["## Where the time went", "", "| model | input | dtype | phase | seconds |", "|---|---|---|---|---|"]
        lines += [f"| {p['model']} | {p['input_size']} | {p['dtype']} | {p['phase']} | {p['seconds']:.1f} |"
                  for p in phases]
        total = sum(c.get("seconds", 0.0) for c in configs)
        lines += ["", f"Models measured in {total:.0f} s of a {run_record['budget_s']:.0f} s budget.", ""]
    lines += [f"Machine: {run_record['device']}; {run_record['machine']}. torch {run_record['torch']}. "
              f"Date: {run_record['date']}. Commit: {run_record['commit']}. Command: `{run_record['command']}`; "
              f"this document: `{command}`.", ""]
    return "\n".join(lines), rows


JSON_FIELDS = ("model", "input_size", "in_chans", "batch", "dtype", "mode", "exits", "images_per_s", "flops_ideal",
               "time_ideal", "time_ideal_fraction", "p50_ms", "p99_ms", "exit_shares", "status", "notes", "device",
               "torch", "date", "commit")


def write_report(args: argparse.Namespace) -> None:
    command = shlex.join([".venv/bin/python", "benchmarks/speed/gpu.py", "--report", str(args.report),
                          *(["--output", str(args.output)] if args.output else []),
                          *(["--json", str(args.json)] if args.json else [])])
    text, rows = report(args.report, command)
    if args.output:
        args.output.write_text(text)
    if args.json:
        args.json.write_text(json.dumps([{k: r.get(k) for k in JSON_FIELDS} for r in rows], indent=1) + "\n")
    if not args.output:
        print(text)
    else:
        print("\n".join(line for line in text.splitlines() if line.startswith("- ")))


# ---- arguments ----------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=torch.device, default=None, help="cuda (default where there is one) or cpu")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu"),
                        help=f"folder for {RESULTS} (default $OUT, else runs/gpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: resnet18 at 32x32, batch 1 and 16, few repeats, no max-autotune")
    parser.add_argument("--configs", type=Config.parse, nargs="+", default=None,
                        help="model:size:dtype, most important first (default: " + " ".join(DEFAULT_CONFIGS) + ")")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--shares", type=float, nargs="+", default=list(MEASURED_SHARES),
                        help="share of images per exit of the measured distribution (gates, then head)")
    parser.add_argument("--images", type=int, default=0, help="benchmark images (default 2048 at 224 px, 4096 at 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-calls", type=int, default=None, help="single-image calls per mode at batch 1")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run (default 330)")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --quick: eager)")
    parser.add_argument("--graph-bucket-cap", type=int, default=128,
                        help="largest CUDA graph bucket of gated graphs at 224 px (graph memory grows with it)")
    parser.add_argument("--max-autotune", default=None,
                        help="model:size:dtype:batch for plain max-autotune, or none (default resnet50:224:bf16:256)")
    parser.add_argument("--autotune-timeout-s", type=float, default=100.0)
    parser.add_argument("--autotune-child", nargs=2, metavar=("CONFIG", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, default=None, help=f"write the document from this {RESULTS}")
    parser.add_argument("--output", type=Path, default=None, help="with --report: the markdown document")
    parser.add_argument("--json", type=Path, default=None, help="with --report: the JSON list of rows")
    args = parser.parse_args(argv)
    if args.report:
        return args
    if args.device is None:
        args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but torch sees no CUDA device")
    if args.autotune_child:
        args.autotune_config, args.autotune_batch = Config.parse(args.autotune_child[0]), int(args.autotune_child[1])
        return args
    if args.device.type != "cuda" and not args.quick:
        print("note: not on CUDA; the graph modes are left out (use --quick for a smoke run)", flush=True)
    quick = args.quick
    args.configs = args.configs or [Config.parse(c) for c in (QUICK_CONFIGS if quick else DEFAULT_CONFIGS)]
    args.batch_sizes = sorted(args.batch_sizes or ([1, 16] if quick else [1, 64, 256, 1024]))
    args.latency_calls = args.latency_calls or (12 if quick else 100)
    args.budget_s = args.budget_s or (300.0 if quick else 330.0)
    args.backend = args.backend or ("eager" if quick else "inductor")
    if quick:
        args.images = args.images or 128
        args.repeats = min(args.repeats, 2)
        if args.device.type == "cpu":
            torch.set_num_threads(1)  # a smoke run on a shared CPU: two threads there wait on each other
    spec = args.max_autotune or ("none" if quick or args.device.type != "cuda" else "resnet50:224:bf16:256")
    if spec == "none" or "plain max-autotune" not in args.modes:
        args.autotune_config, args.autotune_batch = None, None
    else:
        model, size, dtype, batch = spec.split(":")
        args.autotune_config, args.autotune_batch = Config.parse(f"{model}:{size}:{dtype}"), int(batch)
    if abs(sum(args.shares) - 1) > 1e-6:
        parser.error(f"--shares must sum to 1, got {sum(args.shares)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.report:
        write_report(args)
    elif args.autotune_child:
        autotune_child(args)
    else:
        run(args)


if __name__ == "__main__":
    main()

