"""The ``timm-dgate`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo.pipeline import DemoConfig, run_demo

    run_demo(
        DemoConfig(
            output=args.output,
            model=args.model,
            backbone_epochs=args.backbone_epochs,
            gate_epochs=args.gate_epochs,
            limit=args.limit,
            val_size=args.val_size,
            seed=args.seed,
            retrain=args.retrain,
        )
    )
    return 0


def _stages(args: argparse.Namespace) -> int:
    import timm

    from . import stages, wrap

    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes).eval()
    input_size = tuple(args.input_size) if args.input_size else None
    found = stages(model, input_size)
    gated = wrap(model, input_size=input_size) if any(b.default and not b.problem for b in found) else None
    costs = dict(zip([b.module for b in gated.boundaries], gated.costs.cumulative())) if gated else {}
    print(f"{'boundary':<28} {'channels':>8} {'reduction':>9} {'layout':>6}  gate  GFLOPs to gate")
    for b in found:
        gflops = f"{costs[b.module] / 1e9:.4f}" if b.module in costs else "-"
        mark = "yes" if b.default else ""
        print(f"{b.name:<28} {b.num_chs:>8} {b.reduction:>9} {b.layout or '-':>6}  {mark:<4}  {gflops}"
              + (f"   refused: {b.problem}" if b.problem else ""))
    if gated:
        print(f"full model {gated.costs.backbone / 1e9:.4f} GFLOPs, +{sum(gated.costs.gate) / 1e9:.6f} for all gates")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-dgate", description="Decision gates for timm classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the Fashion-MNIST demo: train, gate, calibrate, measure on test")
    demo.add_argument("--output", default="runs/demo", help="folder for results, plots and the cached backbone")
    demo.add_argument("--model", default="resnet18", help="timm architecture of the backbone")
    demo.add_argument("--backbone-epochs", type=int, default=4)
    demo.add_argument("--gate-epochs", type=int, default=300)
    demo.add_argument("--limit", type=int, default=None, help="use only the first N images of each split")
    demo.add_argument("--val-size", type=int, default=5000, help="validation images carved from train")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--retrain", action="store_true", help="train the backbone even if one is cached")
    demo.set_defaults(func=_demo)

    stages_cmd = sub.add_parser("stages", help="where gates can sit in a timm model, and what they cost")
    stages_cmd.add_argument("model", help="timm model name, e.g. resnet50")
    stages_cmd.add_argument("--num-classes", type=int, default=1000)
    stages_cmd.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    stages_cmd.set_defaults(func=_stages)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
