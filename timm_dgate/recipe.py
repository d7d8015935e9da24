"""The fit recipe: a timm classifier and a data set in; a calibrated gated model, its results and plots out.

One implementation behind ``recipes/fit.py`` and ``timm-dgate fit``. It runs as one process or
many under ``accelerate launch``: every process caches the features of its shard of each
split, the gates train on the training shards with gradients summed across processes (so
every rank ends with the same gates), and the validation and test caches are gathered so
the main process calibrates, evaluates and writes the output folder. Cache files are named
by what made them (model, weights, data, input size, gates, rank), so a rerun that changes
only gate or calibration settings skips the backbone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from . import __version__
from .cache import FeatureCache, cache_features, cache_key
from .calibrate import ExitTable, calibrate, tradeoff_curve
from .datasets import RecipeData, SplitData, add_data_arguments, check_data_arguments, data_config
from .errors import InputError, report_errors
from .evaluate import EvalReport, evaluate
from .fit import FitReport, fit
from .hub import profiles_table
from .losses import DEFAULT_EXIT_SCORE
from .model import GatedModel, wrap
from .plots import plot_tradeoff
from .profiles import Profile

HUB_DIR, CACHE_DIR, PLOT_NAME = "hub", "cache", "tradeoff.png"
RESULTS_MD, RESULTS_JSON = "results.md", "results.json"
VALIDATION = "validation: "  # how a recipe profile's ``split`` starts; the rest says which images
DESCRIPTION = (
    "Fit decision gates to a trained timm classifier, calibrate threshold profiles on validation data, "
    "measure them on a held-out test split, and save a loadable folder (timm_dgate.from_pretrained)."
)


# ---- arguments --------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (timm's create_model)")
    group.add_argument("--model", required=True, help="timm architecture, e.g. resnet50")
    group.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (Hub download)")
    group.add_argument("--initial-checkpoint", default="", help="local checkpoint to load (timm's load_checkpoint)")
    group.add_argument("--num-classes", type=int, default=None, help="classes of the model's head")
    group.add_argument("--in-chans", type=int, default=None, help="image channels the model takes")
    group.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                       help="input size; default: the model's pretrained config")
    group.add_argument("--img-size", type=int, default=None, help="square image size (input size is C x N x N)")
    group.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean; default: the model's")
    group.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std; default: the model's")


def add_target_arguments(parser: argparse.ArgumentParser, drops: Sequence[float] = (0, 0.5, 1, 2)) -> None:
    group = parser.add_argument_group("calibration: one threshold profile per target")
    group.add_argument("--max-drop", type=float, nargs="*", default=list(drops), metavar="PT",
                       help="accuracy drops from the plain model on validation, in percentage points "
                       f"(default: {' '.join(f'{d:g}' for d in drops) or 'none'})")
    group.add_argument("--max-gflops", type=float, nargs="*", default=[], metavar="G",
                       help="average GFLOPs per image budgets, gates included")
    group.add_argument("--confidence", type=float, default=None, metavar="P",
                       help="drop targets must hold for this lower confidence bound of the validation "
                       "estimate, e.g. 0.9 (default: the estimate itself)")


def check_target_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if any(d < 0 for d in args.max_drop) or any(g <= 0 for g in args.max_gflops):
        parser.error("--max-drop values must be >= 0 and --max-gflops values > 0")
    if not args.max_drop and not args.max_gflops:
        parser.error("give at least one --max-drop or --max-gflops target")
    if args.confidence is not None and not 0.5 <= args.confidence < 1:
        parser.error(f"--confidence must be in [0.5, 1), got {args.confidence}")


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of the recipe (timm train.py names where they overlap)."""
    add_model_arguments(parser)
    add_data_arguments(parser)
    gates = parser.add_argument_group("gates")
    gates.add_argument("--gates", nargs="+", default=None, metavar="BOUNDARY",
                       help="boundary names or indices (see `timm-dgate stages MODEL`); default: after each stage")
    gates.add_argument("--gate-loss", choices=sorted(DEFAULT_EXIT_SCORE), default="hinge",
                       help="hinge (the paper's one-vs-all SVM gates) or ce (cross-entropy baseline)")
    gates.add_argument("--gate-epochs", type=int, default=300, help="full-batch steps on the cached features")
    gates.add_argument("--gate-lr", type=float, default=0.2, help="Adam learning rate (cosine-decayed)")
    gates.add_argument("--gate-reg", type=float, default=1e-4, help="L2 weight lambda of ||W||^2")
    add_target_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output", default="runs/fit", help="output folder (hub/, cache/, results, plot)")
    out.add_argument("--cache-dir", default=None, help="feature cache folder (default: OUTPUT/cache)")
    out.add_argument("--timing-images", type=int, default=1024, help="test images timed against the plain model")
    out.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also push the folder to this Hub repo")


def check_fit_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_data_arguments(parser, args)
    check_target_arguments(parser, args)
    if args.gate_epochs < 1 or args.gate_lr <= 0 or args.gate_reg < 0:
        parser.error("--gate-epochs and --gate-lr must be positive, --gate-reg not negative")
    if args.initial_checkpoint and not Path(args.initial_checkpoint).is_file():
        parser.error(f"--initial-checkpoint {args.initial_checkpoint} is not a file")
    if args.input_size and args.img_size:
        parser.error("give --input-size or --img-size, not both")


# ---- pieces shared with the other subcommands -----------------------------------------------


def build_model(args: argparse.Namespace) -> nn.Module:
    """The timm model as train.py would build it, weights loaded, in eval mode (same init on every rank)."""
    kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}
    torch.manual_seed(args.seed)
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except (RuntimeError, ValueError, OSError, KeyError) as error:
        raise InputError(f"timm could not create {args.model!r}: {error}") from error
    if args.initial_checkpoint:
        try:
            timm.models.load_checkpoint(model, args.initial_checkpoint)
        except (RuntimeError, ValueError, OSError, KeyError) as error:
            raise InputError(f"cannot load --initial-checkpoint {args.initial_checkpoint}: {error}") from error
    return model.eval()


def wrap_model(model: nn.Module, gates: Sequence[str] | None, input_size: Sequence[int]) -> GatedModel:
    """``wrap`` with CLI-style gate positions (names, or integers as strings)."""
    positions = [int(g) if g.lstrip("-").isdigit() else g for g in gates] if gates else None
    try:
        return wrap(model, positions, input_size=input_size)
    except ValueError as error:
        raise InputError(str(error)) from error


def weights_identity(args: argparse.Namespace) -> str:
    """What the backbone's weights are, for cache names: a checkpoint's hash, a pretrained tag or the init seed."""
    if args.initial_checkpoint:
        digest = hashlib.sha256()
        with open(args.initial_checkpoint, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return f"checkpoint sha256 {digest.hexdigest()}"
    return "pretrained" if args.pretrained else f"random init, seed {args.seed}"


def calibrate_profiles(
    model: GatedModel,
    cache: FeatureCache,
    source: str,
    max_drop: Sequence[float],
    max_gflops: Sequence[float],
    confidence: float | None = None,
) -> list[Profile]:
    """One profile per target (drops in points), named ``drop-<pt>pt`` / ``gflops-<G>``; the first is active.

    Each records which images chose it (``validation: <source>``), for :func:`check_same_holdout`.
    """
    split = f"{VALIDATION}{source}"
    profiles = [
        calibrate(model, cache, max_drop=d / 100, confidence=confidence, name=f"drop-{d:g}pt", split=split)
        for d in max_drop
    ]
    profiles += [calibrate(model, cache, max_gflops=g, name=f"gflops-{g:g}", split=split) for g in max_gflops]
    model.use_profile(profiles[0].name)
    return profiles


def check_same_holdout(profiles: Iterable[Profile], data: RecipeData) -> None:
    """Refuse a validation hold-out of train other than the one the gates were fit without.

    Another seed or fraction would calibrate on images the gates trained on, and thresholds
    chosen there are too optimistic. Folders whose profiles do not say where they came from pass.
    """
    holdout = data.holdout()
    recorded = sorted({p.split.removeprefix(VALIDATION) for p in profiles if p.split.startswith(VALIDATION)})
    if holdout is None or not recorded or any(source.startswith(holdout) for source in recorded):
        return
    raise InputError(
        f"this folder's profiles were calibrated on {' / '.join(recorded)}, but these arguments hold out "
        f"{holdout}, which contains images the gates were fit on; pass the fit's --seed and --val-fraction, "
        "or a validation split of its own with --val-split"
    )


class FeatureStore:
    """Feature caches saved in a folder under names from what made them; a rerun loads instead of recomputing."""

    def __init__(self, folder: Path, identity: dict[str, Any], accelerator: Any):
        self.folder = folder
        self.identity = identity
        self.accelerator = accelerator

    def path(self, split: SplitData) -> Path:
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        key = cache_key(**self.identity, data=split.identity, rank=rank, world=world)
        return self.folder / f"{split.name}-{key}-rank{rank}of{world}.safetensors"

    def features(self, model: GatedModel, loader: Any, split: SplitData) -> FeatureCache:
        path = self.path(split)
        if path.is_file():
            self.accelerator.print(f"reusing cached {split.name} features {path} (the backbone does not run)")
            return FeatureCache.load(path)
        cache = cache_features(model, loader, split=split.name, progress=self.accelerator.is_main_process)
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        cache.save(partial)
        partial.replace(path)  # a run killed while saving leaves no cache that looks whole
        return cache


def gather_cache(cache: FeatureCache, accelerator: Any) -> FeatureCache:
    """Every process's shard of a cache, concatenated on every process (one process: the cache itself)."""
    if accelerator.num_processes == 1:
        return cache
    gathered = []
    for tensor in [*cache.features, cache.logits, cache.labels]:
        local = tensor.to(accelerator.device)
        sizes = accelerator.gather(torch.tensor([len(local)], device=accelerator.device)).tolist()
        padded = accelerator.pad_across_processes(local, dim=0)
        rows = accelerator.gather(padded).cpu()
        width = len(padded)
        gathered.append(torch.cat([rows[r * width : r * width + n] for r, n in enumerate(sizes)]))
    *features, logits, labels = gathered
    return FeatureCache(features, logits, labels, cache.split)


# ---- the recipe ---------------------------------------------------------------------------------


def run_fit(args: argparse.Namespace) -> int:
    """The whole recipe; see the module doc and docs/recipes.md."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))
    say = accelerator.print
    model = build_model(args)
    if not (args.pretrained or args.initial_checkpoint):
        say("warning: no --pretrained or --initial-checkpoint, so the backbone has random weights")
    config = data_config(model, args.input_size, args.img_size, args.mean, args.std)
    gated = wrap_model(model, args.gates, config["input_size"]).to(accelerator.device)
    data = RecipeData(args, config)
    splits = data.splits()
    for split in splits.values():
        say(f"{split.name}: {len(split)} images ({split.source})")
    if not args.val_split:
        say("thresholds are chosen on the held-out validation images only; gates never train on them")
    say(f"gates after {', '.join(b.name for b in gated.boundaries)} at input size {tuple(config['input_size'])}")

    out = Path(args.output)
    identity = {
        "model": args.model, "weights": weights_identity(args), "num_classes": gated.num_classes,
        "data_config": config, "gates": [b.module for b in gated.boundaries], "pool": gated.pool,
        "batch_size": args.batch_size, "timm_dgate": __version__,
    }
    store = FeatureStore(Path(args.cache_dir) if args.cache_dir else out / CACHE_DIR, identity, accelerator)
    caches = {
        name: store.features(gated, accelerator.prepare_data_loader(data.loader(split)), split)
        for name, split in splits.items()
    }
    report = fit(
        gated, caches["train"], loss=args.gate_loss, epochs=args.gate_epochs, lr=args.gate_lr, reg=args.gate_reg,
        accelerator=accelerator, seed=args.seed, progress=accelerator.is_main_process,
    )
    say(f"{args.gate_loss} gates fitted on {report.num_samples} images by {report.num_processes} process(es); "
        "train accuracy per gate: " + ", ".join(f"{100 * a:.1f}%" for a in report.train_accuracy))
    held_out = {name: gather_cache(caches[name], accelerator) for name in ("validation", "test") if name in caches}
    if not accelerator.is_main_process:
        return 0
    profiles = calibrate_profiles(
        gated, held_out["validation"], splits["validation"].source, args.max_drop, args.max_gflops, args.confidence
    )
    test_report = None
    if "test" in splits:
        test_report = evaluate(gated, data.loader(splits["test"]), split=args.test_split,
                               timing_images=args.timing_images)
        say(test_report.table())
    write_outputs(out, gated, args, splits, report, profiles, held_out, test_report)
    return 0


def write_outputs(
    out: Path,
    gated: GatedModel,
    args: argparse.Namespace,
    splits: dict[str, SplitData],
    report: FitReport,
    profiles: list[Profile],
    held_out: dict[str, FeatureCache],
    test_report: EvalReport | None,
) -> None:
    """The trade-off plot, results.md/json and the Hub folder; pushes if asked."""
    out.mkdir(parents=True, exist_ok=True)
    measured = "test" if "test" in held_out else "validation"
    val_table = ExitTable.from_cache(gated, held_out["validation"])
    table = ExitTable.from_cache(gated, held_out[measured])
    points = [(p.name, *table.evaluate(p.thresholds)[:2]) for p in profiles]
    plot_tradeoff(
        {f"{gated.gate_loss} gates (thresholds from validation)": [
            table.evaluate(t)[:2] for t in tradeoff_curve(val_table)
        ]},
        (table.plain_accuracy, gated.costs.backbone / 1e9), out / PLOT_NAME,
        split=measured, profiles=points, title=f"{args.model}: accuracy against cost on {measured}",
    )
    hub = gated.save_pretrained(out / HUB_DIR, tradeoff_plot=out / PLOT_NAME)
    sizes = {name: {"images": len(s), "source": s.source} for name, s in splits.items()}
    results = {
        "args": vars(args), "data": sizes, "gates": [b.name for b in gated.boundaries],
        "plain_gflops": gated.costs.backbone / 1e9, "fit": asdict(report),
        "profiles": [p.to_dict() for p in profiles], "test": asdict(test_report) if test_report else None,
    }
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2, default=str))
    (out / RESULTS_MD).write_text(results_markdown(gated, args, sizes, report, profiles, test_report))
    print(f"wrote {out / RESULTS_MD}, {out / RESULTS_JSON}, {out / PLOT_NAME}; "
          f"gated model in {hub} (timm_dgate.from_pretrained({str(hub)!r}))")
    if args.push_to_hub:
        gated.push_to_hub(args.push_to_hub, tradeoff_plot=out / PLOT_NAME)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")


def results_markdown(
    gated: GatedModel,
    args: argparse.Namespace,
    sizes: dict[str, dict],
    report: FitReport,
    profiles: list[Profile],
    test_report: EvalReport | None,
) -> str:
    data = "; ".join(f"{name} {s['images']} images ({s['source']})" for name, s in sizes.items())
    gates = ", ".join(f"{b.name} {100 * a:.1f}%" for b, a in zip(gated.boundaries, report.train_accuracy))
    test = (
        f"## Test split `{test_report.split}` ({test_report.num_images} images; it chose nothing)\n\n"
        f"{test_report.table()}\n"
        if test_report
        else "No --test-split was given: the numbers above come from the validation split that chose the "
        "thresholds, so they flatter the gates. Measure on held-out data with `timm-dgate eval`.\n"
    )
    return (
        f"# {args.model} with {gated.gate_loss} decision gates\n\n"
        f"Data: {args.dataset or 'image folder'} at {args.data_dir}: {data}.\n\n"
        f"Gate train accuracy: {gates}. Plain model: {gated.costs.backbone / 1e9:.4f} GFLOPs per image.\n\n"
        f"{profiles_table(profiles)}\n{test}\n![accuracy against cost]({PLOT_NAME})\n"
    )


def build_parser(prog: str = "recipes/fit.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_fit_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_fit_arguments(parser, args)
    return report_errors(parser, lambda: run_fit(args))
