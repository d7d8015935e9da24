"""The command-line flags of the recipe and the ``timm-dgate`` subcommands (timm train.py names where they
overlap), and their translation into the typed configs the code runs on.

Flags that argparse can check alone are checked here and reported like argparse's own errors;
everything else is checked by the configs themselves (``DataConfig``, ``RecipeConfig``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..core.gates import gate_head
from ..fitting.gate_kinds import DEFAULT_GATE_KIND, GATE_KINDS
from ..fitting.training import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS

DESCRIPTION = (
    "Fit decision gates to a trained timm classifier, calibrate threshold profiles on validation data, "
    "measure them on a held-out test split, and save a loadable folder (timm_dgate.from_pretrained)."
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (timm's create_model)")
    group.add_argument("--model", default=None, help="timm architecture, e.g. resnet50 (or --cascade)")
    group.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (Hub download)")
    group.add_argument("--initial-checkpoint", default="", help="local checkpoint to load (timm's load_checkpoint)")
    group.add_argument("--num-classes", type=int, default=None, help="classes of the model's head")
    group.add_argument("--in-chans", type=int, default=None, help="image channels the model takes")
    group.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                       help="input size; default: the model's pretrained config")
    group.add_argument("--img-size", type=int, default=None, help="square image size (input size is C x N x N)")
    group.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean; default: the model's")
    group.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std; default: the model's")


def add_data_arguments(parser: argparse.ArgumentParser, test_split: str = "") -> None:
    """The data flags (fields of :class:`timm_dgate.cli.recipe_data.DataConfig`)."""
    group = parser.add_argument_group("data (timm's create_dataset)")
    group.add_argument("--data-dir", default=None, help="root folder of the data set")
    group.add_argument(
        "--dataset", default="",
        help="timm data set name: '' (an image folder with train/, validation/ sub-folders), "
        "'torch/fashion_mnist', 'torch/cifar10', 'hfds/<name>', ... (default: image folder)",
    )
    group.add_argument("--train-split", default="train", help="split the gates train on")
    group.add_argument(
        "--val-split", default="",
        help="split that chooses thresholds; default: none, hold out --val-fraction of the train split",
    )
    group.add_argument(
        "--val-fraction", type=float, default=0.1,
        help="fraction of the train split held out for validation when there is no --val-split",
    )
    group.add_argument(
        "--test-split", default=test_split, help="held-out split the results are measured on (never tunes anything)"
    )
    group.add_argument("--limit", type=int, default=None, help="use a seeded random N images of each split")
    group.add_argument("-b", "--batch-size", type=int, default=128, help="images per backbone batch")
    group.add_argument("-j", "--workers", type=int, default=2, help="data loading processes")
    group.add_argument("--seed", type=int, default=42, help="seed of the validation hold-out, subsets and init")


def add_target_arguments(parser: argparse.ArgumentParser, drops: Sequence[float] = (0, 0.5, 1, 2)) -> None:
    group = parser.add_argument_group("calibration: one threshold profile per target")
    group.add_argument("--max-drop", type=float, nargs="*", default=list(drops), metavar="PT",
                       help="accuracy drops from the plain model on validation, in percentage points: "
                       f"0.5 is half a point (default: {' '.join(f'{d:g}' for d in drops) or 'none'})")
    group.add_argument("--max-gflops", type=float, nargs="*", default=[], metavar="G",
                       help="average GFLOPs per image budgets, gates included")
    group.add_argument("--confidence", type=float, default=None, metavar="P",
                       help="drop targets must hold on new data with this probability, e.g. 0.9: half the "
                       "validation images propose thresholds, the other half tests them (default: the "
                       "validation estimate itself, which new data misses about half the time)")


def add_chance_argument(parser: argparse.ArgumentParser) -> None:
    """The override of the plain-model check that calibration and evaluation make (``allow_chance_accuracy``)."""
    parser.add_argument(
        "--allow-chance-accuracy", action="store_true",
        help="go on when the plain model scores about chance on the labelled data (by default an error: "
        "usually a checkpoint that did not load, preprocessing unlike training's, or another class order)",
    )


def check_target_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if any(not 0 <= d < 100 for d in args.max_drop) or any(g <= 0 for g in args.max_gflops):
        parser.error("--max-drop values are points in [0, 100) (0.5 is half a point); --max-gflops values must be > 0")
    if not args.max_drop and not args.max_gflops:
        parser.error("give at least one --max-drop or --max-gflops target")
    if args.confidence is not None and not 0.5 <= args.confidence < 1:
        parser.error(f"--confidence must be in [0.5, 1), got {args.confidence}")


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of the recipe (fields of :class:`timm_dgate.cli.recipe.RecipeConfig`)."""
    add_model_arguments(parser)
    add_data_arguments(parser)
    gates = parser.add_argument_group("gates")
    gates.add_argument("--gates", nargs="+", default=None, metavar="BOUNDARY",
                       help="boundary names or indices (see `timm-dgate stages MODEL [--level block]`), or `blocks` "
                            "for every block end; default: after each stage")
    gates.add_argument("--gate-kind", choices=list(GATE_KINDS), default=DEFAULT_GATE_KIND,
                       help="how the gates are built and trained (docs/concepts.md, 'Gate kinds'); "
                            "mlp measured best, hinge is the paper's")
    gates.add_argument("--gate-epochs", type=int, default=DEFAULT_EPOCHS, help="passes over the cached features")
    gates.add_argument("--gate-batch-size", type=_batch_size, default=DEFAULT_BATCH_SIZE, metavar="N|full",
                       help="images per Adam step on the cached features, over all processes; `full`: one "
                            "full-batch step per epoch")
    gates.add_argument("--gate-lr", type=float, default=None,
                       help="Adam learning rate, cosine-decayed (default: the kind's gate head's, "
                            f"{gate_head('linear').default_lr:g} linear, {gate_head('mlp').default_lr:g} mlp)")
    gates.add_argument("--gate-reg", type=float, default=1e-4, help="L2 weight lambda of ||W||^2")
    add_cascade_arguments(parser)
    add_target_arguments(parser)
    add_chance_argument(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output", default="runs/fit", help="output folder (hub/, cache/, results, plot)")
    out.add_argument("--cache-dir", default=None, help="feature cache folder (default: OUTPUT/cache)")
    out.add_argument("--timing-images", type=int, default=1024, help="test images timed against the plain model")
    out.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also push the folder to this Hub repo")


def _batch_size(text: str) -> int | None:
    """``--gate-batch-size``: a positive count, or ``full`` (None: the whole cache per step)."""
    if text == "full":
        return None
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images or 'full', got {text!r}")
    return size


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_cascade_arguments(parser: argparse.ArgumentParser) -> None:
    """A cascade of models instead of one (fields ``cascade*`` of :class:`timm_dgate.cli.recipe.RecipeConfig`)."""
    group = parser.add_argument_group("cascade (docs/cascades.md)")
    group.add_argument("--cascade", type=_names, default=None, metavar="MODELS",
                       help="comma-separated timm architectures, cheapest first (resnet10t,resnet50): fit and "
                       "calibrate a cascade whose members' heads are exits, instead of --model")
    group.add_argument("--cascade-checkpoints", type=_names, default=None, metavar="PATHS",
                       help="comma-separated local checkpoints, one per --cascade member (instead of "
                       "--initial-checkpoint)")
    group.add_argument("--cascade-gates", choices=("last", "all", "none"), default="last",
                       help="which members get gates (--gates places the last member's); the others answer at "
                       "their heads only (default: last)")


def check_fit_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_target_arguments(parser, args)
    if bool(args.model) == bool(args.cascade):
        parser.error("give --model, or --cascade with two or more models (not both)")
    if args.cascade is not None:
        if len(args.cascade) < 2:
            parser.error(f"--cascade needs two or more comma-separated models, cheapest first; got {args.cascade}")
        if args.initial_checkpoint:
            parser.error("with --cascade, give one checkpoint per member in --cascade-checkpoints")
        if args.cascade_checkpoints and len(args.cascade_checkpoints) != len(args.cascade):
            parser.error(f"--cascade-checkpoints has {len(args.cascade_checkpoints)} paths for "
                         f"{len(args.cascade)} --cascade members")
    elif args.cascade_checkpoints:
        parser.error("--cascade-checkpoints goes with --cascade")
    if args.gate_epochs < 1 or (args.gate_lr is not None and args.gate_lr <= 0) or args.gate_reg < 0:
        parser.error("--gate-epochs and --gate-lr must be positive, --gate-reg not negative")
    if args.num_classes is not None and args.num_classes < 1:
        parser.error(f"--num-classes must be positive, got {args.num_classes}")
    if args.input_size and args.img_size:
        parser.error("give --input-size or --img-size, not both")


def build_fit_parser(prog: str = "recipes/fit.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_fit_arguments(parser)
    return parser
