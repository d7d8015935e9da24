"""The ``timm-dgate`` command line and ``recipes/fit.py``: parse flags into configs, run, report user errors.

A user error (:mod:`timm_dgate.errors`) ends the program like an argparse error: one line on
stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from ..errors import (
    CalibrationError,
    ChanceAccuracyError,
    HubFormatError,
    HubUnreachableError,
    InputError,
    UnsupportedModelError,
)
from ..fitting.training import DEFAULT_EPOCHS
from .arguments import (
    DESCRIPTION,
    add_chance_argument,
    add_data_arguments,
    add_fit_arguments,
    add_target_arguments,
    build_fit_parser,
    check_fit_arguments,
    check_target_arguments,
)


def report_errors(parser: argparse.ArgumentParser, call: Callable[[], int]) -> int:
    """Run ``call``; a user error ends the program like an argparse error: one line, exit code 2, no traceback."""
    try:
        return call()
    except (
        InputError, UnsupportedModelError, HubFormatError, HubUnreachableError, CalibrationError, ChanceAccuracyError
    ) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def _demo(args: argparse.Namespace) -> int:
    from ..demo.pipeline import DemoConfig, run_demo

    if args.confidence and not 0.5 <= args.confidence < 1:  # checked before minutes of backbone training
        raise InputError(f"--confidence must be in [0.5, 1), or 0 for none; got {args.confidence}")
    run_demo(
        DemoConfig(
            output=args.output,
            model=args.model,
            backbone_epochs=args.backbone_epochs,
            gate_epochs=args.gate_epochs,
            limit=args.limit,
            val_size=args.val_size,
            seed=args.seed,
            confidence=args.confidence or None,
            retrain=args.retrain,
        )
    )
    return 0


def _stages(args: argparse.Namespace) -> int:
    import timm

    from ..boundaries.probe import default_input_size
    from ..boundaries.selection import stages
    from ..core.costs import costs_to

    if not timm.is_model(args.model):
        raise InputError(f"unknown timm model {args.model!r}; timm.list_models('*{args.model[:6]}*') lists similar")
    channels = {"in_chans": args.input_size[0]} if args.input_size else {}  # the model takes what it is shown
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **channels).eval()
    input_size = tuple(args.input_size) if args.input_size else default_input_size(model)
    found = stages(model, input_size, level=args.level)
    print(f"{'boundary':<28} {'channels':>8} {'reduction':>9} {'layout':>6}  gate  GFLOPs to it")
    for b in found:
        gflops = "-" if b.gflops is None else f"{b.gflops:.4f}"
        mark = "yes" if b.default else ""
        print(f"{b.name:<28} {b.num_chs:>8} {b.reduction:>9} {b.layout or '-':>6}  {mark:<4}  {gflops}"
              + (f"   refused: {b.problem}" if b.problem else ""))
    print(f"full model {costs_to(model, [], input_size)[2] / 1e9:.4f} GFLOPs")
    return 0


def _load(args: argparse.Namespace):
    """The saved gated model or cascade and its data, preprocessed as the (last) backbone's saved config says."""
    from ..models.auto import from_pretrained
    from ..models.cascade import Cascade
    from .recipe_data import DataConfig, RecipeData, data_config

    gated = from_pretrained(args.folder)
    unknown = [p for p in getattr(args, "profile", None) or [] if p not in gated.profiles]
    if unknown:
        raise InputError(f"{args.folder} has no profile {', '.join(unknown)}; it has: {', '.join(gated.profiles)}")
    last = gated.members[-1] if isinstance(gated, Cascade) else gated  # a cascade resizes for the others
    return gated, RecipeData(DataConfig.from_args(args), data_config(last.base_model, last.input_size))


def _calibrate(args: argparse.Namespace) -> int:
    from ..calibration.calibrate import calibrate_targets
    from ..core.cache import cache_features
    from ..models.cascade import Cascade
    from ..reports import profiles_table
    from .recipe_data import VALIDATION

    gated, data = _load(args)
    data.check_same_holdout(gated.profiles.values())
    val = data.splits(need_test=False)["validation"]
    print(f"calibrating on {len(val)} validation images ({val.source})")
    if isinstance(gated, Cascade):  # one pass per member, rows lined up
        cache = gated.cache_features(data.loader(val), "validation")
    else:
        cache = cache_features(gated, data.loader(val), split="validation")
    profiles = calibrate_targets(
        gated, cache, f"{VALIDATION}{val.source}", args.max_drop, args.max_gflops, args.confidence,
        allow_chance_accuracy=args.allow_chance_accuracy,
    )
    print(profiles_table(profiles))
    out = gated.save_pretrained(args.output or args.folder)  # gates-only stays gates-only (the config says)
    print(f"saved {len(gated.profiles)} profiles to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import evaluate

    gated, data = _load(args)
    test = data.test()
    report = evaluate(gated, data.loader(test), args.profile, split=args.test_split, timing_images=args.timing_images,
                      allow_chance_accuracy=args.allow_chance_accuracy)
    print(f"{args.test_split}: {len(test)} images ({test.source})\n")
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation.bench import throughput
    from ..evaluation.results import throughput_table

    gated, data = _load(args)
    split = data.test() if args.test_split else data.splits(need_test=False)["validation"]
    images = torch.cat([x for x, _ in data.loader(split)])[: args.images].to(next(gated.parameters()).device)
    names = args.profile or list(gated.profiles)
    if not names:
        raise InputError(f"{args.folder} has no threshold profiles to time; run `timm-dgate calibrate` first")
    print(f"{len(images)} {split.name} images ({split.source}); profiles: {', '.join(names)}\n")
    print(throughput_table(throughput(gated, images, args.batch_sizes, names, args.repeats)))
    return 0


def _push(args: argparse.Namespace) -> int:
    from ..hub.names import PLOT_NAME
    from ..models.auto import from_pretrained
    from ..models.cascade import Cascade

    folder = Path(args.folder)
    gated = from_pretrained(folder)  # checks every file before anything is uploaded
    plot = folder / PLOT_NAME
    extra = {} if isinstance(gated, Cascade) else {"tradeoff_plot": plot if plot.is_file() else None}
    info = gated.push_to_hub(
        args.repo_id, private=args.private or None, revision=args.revision, token=args.token, **extra
    )
    print(f"pushed {folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from .recipe import RecipeConfig, run_fit

    config = RecipeConfig.from_args(args)
    if config.cascade:
        from .cascade_recipe import run_cascade_fit

        return run_cascade_fit(config)
    return run_fit(config)


def _check_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not Path(args.folder).is_dir():
        parser.error(f"{args.folder} is not a folder saved by save_pretrained or `timm-dgate fit`")


def _check_calibrate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_data(parser, args)
    check_target_arguments(parser, args)


def _check_eval(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_data(parser, args)
    if not args.test_split:
        parser.error("--test-split is required: the split to measure on")


def _check_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_data(parser, args)
    if min(args.batch_sizes) < 1 or args.images < 1 or args.repeats < 1:
        parser.error("--batch-sizes, --images and --repeats must be positive")


def _folder_command(sub, name: str, help: str, test_split: str = ""):
    command = sub.add_parser(name, help=help, description=help)
    command.add_argument(
        "folder", help="a gated model or cascade folder (save_pretrained, or OUTPUT/hub of `timm-dgate fit`)"
    )
    add_data_arguments(command, test_split=test_split)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-dgate", description="Decision gates for timm classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the Fashion-MNIST demo: train, gate, calibrate, measure on test")
    demo.add_argument("--output", default="runs/demo", help="folder for results, plots and the cached backbone")
    demo.add_argument("--model", default="resnet18", help="timm architecture of the backbone")
    demo.add_argument("--backbone-epochs", type=int, default=4, help="epochs to train the backbone (first run only)")
    demo.add_argument("--gate-epochs", type=int, default=DEFAULT_EPOCHS, help="passes over the cached features")
    demo.add_argument("--limit", type=int, default=None, help="use only the first N images of each split")
    demo.add_argument("--val-size", type=int, default=5000, help="validation images carved from train")
    demo.add_argument("--seed", type=int, default=0, help="seeds the validation split, training and gates")
    demo.add_argument("--confidence", type=float, default=0.9,
                      help="accuracy targets must hold on new data with this probability (0: the validation "
                      "estimate itself)")
    demo.add_argument("--retrain", action="store_true", help="train the backbone even if one is cached")
    demo.set_defaults(func=_demo)

    stages_cmd = sub.add_parser("stages", help="where gates can sit in a timm model, and what they cost")
    stages_cmd.add_argument("model", help="timm model name, e.g. resnet50")
    stages_cmd.add_argument("--num-classes", type=int, default=1000)
    stages_cmd.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    stages_cmd.add_argument("--level", choices=("stage", "block"), default="stage",
                            help="stage ends (feature_info) or every block end of a staged network")
    stages_cmd.set_defaults(func=_stages)

    fit_cmd = sub.add_parser("fit", help="the fit recipe (recipes/fit.py): fit, calibrate, evaluate, save",
                             description=DESCRIPTION)
    add_fit_arguments(fit_cmd)
    fit_cmd.set_defaults(func=_fit, check=check_fit_arguments)

    calibrate_cmd = _folder_command(sub, "calibrate", "calibrate new threshold profiles on validation data; save back")
    add_target_arguments(calibrate_cmd)
    add_chance_argument(calibrate_cmd)
    calibrate_cmd.add_argument("--output", default=None, help="folder to save to (default: the folder itself)")
    calibrate_cmd.set_defaults(func=_calibrate, check=_check_calibrate)

    eval_cmd = _folder_command(sub, "eval", "measure the folder's profiles on a held-out split (paper-style table)",
                               test_split="test")
    eval_cmd.add_argument("--profile", nargs="+", default=None, help="profiles to measure (default: all)")
    eval_cmd.add_argument("--timing-images", type=int, default=1024, help="images timed against the plain model")
    eval_cmd.add_argument("--json", default=None, help="also write the report to this JSON file")
    add_chance_argument(eval_cmd)
    eval_cmd.set_defaults(func=_eval, check=_check_eval)

    bench_cmd = _folder_command(sub, "bench", "images/s of each profile against the plain model, per batch size")
    bench_cmd.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256], help="batch sizes to time")
    bench_cmd.add_argument("--images", type=int, default=512,
                           help="images timed (test split if given, else validation)")
    bench_cmd.add_argument("--repeats", type=int, default=3, help="timed passes; the median counts")
    bench_cmd.add_argument("--profile", nargs="+", default=None, help="profiles to time (default: all)")
    bench_cmd.set_defaults(func=_bench, check=_check_bench)

    push = sub.add_parser("push", help="push a saved gated folder to the Hugging Face Hub",
                          description="Load a saved folder (which checks it), then push it to a Hub repo.")
    push.add_argument("folder", help="a gated model or cascade folder")
    push.add_argument("repo_id", help="Hub repo, e.g. org/resnet50-dgate")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", default=None, help="branch to push to (created if needed)")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    push.set_defaults(func=_push)

    from .serve import add_serve_command

    add_serve_command(sub)
    for command in sub.choices.values():
        command.set_defaults(parser=command)  # errors are reported as the subcommand's
    return parser


def fit_main(argv: Sequence[str] | None = None) -> int:
    """``recipes/fit.py``: the fit recipe on its own."""
    parser = build_fit_parser()
    args = parser.parse_args(argv)
    check_fit_arguments(parser, args)
    return report_errors(parser, lambda: _fit(args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "check"):
        args.check(args.parser, args)
    return report_errors(args.parser, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
