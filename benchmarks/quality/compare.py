"""Accuracy vs FLOPs of early-exit methods on Fashion-MNIST, at equal backbone, thresholds chosen on validation.

Per model: the plain timm backbone (trained here, ``benchmarks/backbones.py``); hinge
d-gates (the paper); cross-entropy gates with max-softmax (SDN) and entropy (BranchyNet)
exits; the gate kinds beyond them (``timm_dgate.fitting.gate_kinds``: distillation, MLP gates,
survivor weighting; ``METHODS`` in ``common.py``); earlyon 0.3.0 on the same weights
(ResNets only, ``earlyon_adapter.py``). Smaller
static timm models of the same family are measured by ``backbones.py``. Every threshold is
chosen on the 5,000-image validation split carved from train (as the demo); every reported
number is on the 10,000-image test split. Also measures what fitting costs (``fit_cost.py``) against one
plain inference pass over the training set. Wall-clock is ``speed.py``'s job; the document
is ``report.py``'s.

    .venv/bin/python benchmarks/quality/compare.py --models resnet18 resnet50 convnext_atto
    .venv/bin/python benchmarks/quality/compare.py --models resnet18 --quick      # smoke run on small slices
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `benchmarks.*`

from benchmarks import earlyon_adapter
from benchmarks.common import METHODS, backbone_epochs, fixed_points, load_backbone, profile_name
from timm_dgate import FeatureCache, GatedModel, cache_features, wrap
from timm_dgate.calibration.curves import measured_tradeoff
from timm_dgate.core.exit_table import ExitTable
from timm_dgate.demo.pipeline import DROPS
from timm_dgate.evaluation.timing import per_image, time_pass
from timm_dgate.fashion_mnist import TensorBatches, load_splits, preprocess
from timm_dgate.fitting.gate_kinds import GATE_KINDS
from timm_dgate.fitting.training import DEFAULT_EPOCHS

# its stage 2 runs the backbone every step (the dominant cost here); its own default is 20 epochs
EARLYON_EPOCHS = {"resnet18": 10, "resnet50": 5}
EARLYON_SWEEP = (0.0, 0.0025, 0.03, 0.05, 0.1, 0.2)  # extra budgets, with DROPS, for its curve


def sliced(data: TensorDataset, limit: int | None) -> TensorDataset:
    """The first ``limit`` images (all: None): smoke runs and smaller training sets cut every split alike."""
    images, labels = data.tensors
    return TensorDataset(images[:limit], labels[:limit]) if limit else data


@contextmanager
def timed(into: dict, key: str) -> Iterator[None]:
    """Seconds of one phase into ``into[key]``, printed as it ends (a run takes most of an hour)."""
    start = time.perf_counter()
    yield
    into[key] = time.perf_counter() - start
    print(f"  {key}: {into[key]:.1f}s", flush=True)


def plain_pass_seconds(model: torch.nn.Module, data: TensorDataset, images: int | None, input_size: int) -> float:
    """Seconds per image of the plain model over the first ``images`` training images (all: None), batches of 256.

    Preprocessing is timed too, as in the caching pass this is the reference for.
    """
    raw = sliced(data, images).tensors[0].split(256)
    return per_image([time_pass(lambda x: model(preprocess(x, input_size)), raw)], raw)


def accuracy_of(cache: FeatureCache) -> float:
    """The plain model's accuracy, read off the logits a caching pass stored anyway."""
    return (cache.logits.argmax(1) == cache.labels).double().mean().item()


def fit_in_child(name: str, cache_path: Path, val_path: Path, kind: str, out: Path, epochs: int) -> dict:
    """Run ``fit_cost.py`` in a fresh process (clean maxrss) with this process's thread count; returns its JSON."""
    script = Path(__file__).with_name("fit_cost.py")
    command = [sys.executable, str(script), "--model", name, "--cache", str(cache_path), "--kind", kind,
               "--val-cache", str(val_path), "--out", str(out), "--epochs", str(epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def earlyon_val_pass_once() -> Iterator[None]:
    """earlyon's calibrator re-runs the network over the validation loader on every call; its heads
    and backbone are frozen by then, so the logits are the same each time: run that pass once."""
    import earlyon.core.thresholds as thresholds

    original, memo = thresholds.collect_head_logits, {}

    def collect(model: torch.nn.Module, loader: TensorBatches, device: str) -> object:
        key = (id(model), id(loader))
        if key not in memo:
            memo[key] = original(model, loader, device)
        return memo[key]

    thresholds.collect_head_logits = collect
    try:
        yield
    finally:
        thresholds.collect_head_logits = original


def run_earlyon(name: str, backbone: torch.nn.Module, loaders: dict, input_size: tuple, epochs: int,
                out: Path, result: dict) -> None:
    """Its exit-head training, its calibration per target on val, scored on test with our FLOPs count."""
    wrapper = earlyon_adapter.build(backbone, name, input_size)
    result["earlyon_epochs"] = epochs
    result["earlyon_train_s"], result["earlyon_train_accuracy"] = earlyon_adapter.train_heads(
        wrapper, loaders["train_128"], epochs
    )
    costs = earlyon_adapter.costs(wrapper, input_size)
    result["earlyon_costs"] = {"to_gate": costs.to_gate, "gate": costs.gate, "backbone": costs.backbone}
    result["earlyon_layers"] = [ep.layer_name for ep in wrapper.config.exit_points]
    result["earlyon_own_estimate"] = {
        "fractions": wrapper.flops_estimate.fractions, "method": wrapper.flops_estimate.method,
        "reliable": wrapper.flops_estimate.reliable,
    }
    test_logits = earlyon_adapter.collect(wrapper, loaders["test"])
    policies = {}
    with earlyon_val_pass_once():
        for label, drop in {**DROPS, **{f"{100 * d:g}pt" : d for d in EARLYON_SWEEP}}.items():
            policy = earlyon_adapter.calibrate(wrapper, loaders["val"], drop)
            accuracy, gflops, fractions = earlyon_adapter.score(wrapper, test_logits, costs, policy)
            policies[label] = {**policy, "drop": drop, "accuracy": accuracy, "gflops": gflops,
                               "exit_fractions": fractions}
    result["earlyon"] = policies
    torch.save({"heads": wrapper.exit_heads.state_dict(), "policies": policies}, out / "earlyon.pt")


def run_model(name: str, args: argparse.Namespace, out_root: Path) -> dict:
    """Everything measured on one backbone, written to ``<out_root>/<name>/results.json`` (and returned)."""
    print(f"== {name}", flush=True)
    full = load_splits()
    backbone = load_backbone(name, full)
    splits = {key: sliced(getattr(full, key), args.limit) for key in ("train", "val", "test")}
    splits["train"] = sliced(splits["train"], args.train_limit)
    input_size = (1, args.input_size, args.input_size)
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": name, "backbone_epochs": backbone_epochs(name),
                    "sizes": {k: len(v.tensors[1]) for k, v in splits.items()}, "seconds": {}}
    seconds = result["seconds"]
    loaders = {key: TensorBatches(data, args.input_size) for key, data in splits.items()}
    loaders["train_128"] = TensorBatches(splits["train"], args.input_size, batch_size=128)
    plain = copy.deepcopy(backbone)  # no hooks: the reference for timing and the plain pass
    kinds = dict.fromkeys(kind for kind, _ in METHODS.values())
    gated = {
        kind: wrap(backbone, input_size=input_size, gate_head=GATE_KINDS[kind].head,
                   gate_head_options=GATE_KINDS[kind].head_options)
        for kind in kinds
    }
    costs = gated["hinge"].costs
    result["gates"] = [b.name for b in gated["hinge"].boundaries]
    result["costs"] = {"to_gate": costs.to_gate, "gate": costs.gate, "backbone": costs.backbone}

    with timed(seconds, "cache_train"):
        train = cache_features(gated["hinge"], loaders["train"], split="train", progress=False)
    # right after the caching pass, so that both see the same machine load
    seconds["plain_pass_per_image"] = plain_pass_seconds(
        plain, splits["train"], args.plain_pass_images, args.input_size
    )
    seconds["plain_pass_train"] = seconds["plain_pass_per_image"] * len(splits["train"].tensors[1])
    print(f"  plain pass over train: {seconds['plain_pass_train']:.1f}s")
    caches = {"val": cache_features(gated["hinge"], loaders["val"], split="validation", progress=False),
              "test": cache_features(gated["hinge"], loaders["test"], split="test", progress=False)}
    result["plain"] = {"val_accuracy": accuracy_of(caches["val"]), "accuracy": accuracy_of(caches["test"]),
                       "gflops": costs.backbone / 1e9}
    cache_path, val_path = out / "train_cache.safetensors", out / "val_cache.safetensors"
    train.save(cache_path)
    caches["val"].save(val_path)
    del train

    result["fit"] = {}
    for kind, model in gated.items():
        gates_path = out / f"{kind}_gates.pt"
        result["fit"][kind] = fit_in_child(name, cache_path, val_path, kind, gates_path, args.gate_epochs)
        model.gates.load_state_dict(torch.load(gates_path))
        model.freeze_backbone()
        # what fit() records in the child, and the loss's natural exit score
        model.set_gate_loss(GATE_KINDS[kind].loss, GATE_KINDS[kind].distill)
        print(f"  fitted {kind} gates in {result['fit'][kind]['fit_s']:.1f}s", flush=True)
    cache_path.unlink()
    val_path.unlink()

    result["methods"] = {}
    for method, (kind, score) in METHODS.items():
        model = gated[kind]
        test_table = ExitTable.from_cache(model, caches["test"], score)
        points = fixed_points(model, score, caches["val"], test_table)
        result["methods"][method] = {
            "kind": kind, "score": score, "gate_gflops": [g / 1e9 for g in model.costs.gate],
            "points": [p.to_dict() for p in points],
            "curve": measured_tradeoff(ExitTable.from_cache(model, caches["val"], score), test_table),
        }
    result["engine_check"] = check_engine(gated["hinge"], caches["test"], loaders["test"], args.check_images)
    for kind, model in gated.items():
        model.save_pretrained(out / f"{kind}_gated", include_backbone=True)

    if name in earlyon_adapter.SUPPORTED and not args.no_earlyon:
        if not earlyon_adapter.available():
            raise SystemExit(earlyon_adapter.INSTALL)
        epochs = args.earlyon_epochs or EARLYON_EPOCHS.get(name, 5)
        run_earlyon(name, backbone, loaders, input_size, epochs, out, result)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"  wrote {out / 'results.json'}", flush=True)
    return result


@torch.inference_mode()
def check_engine(model: GatedModel, test: FeatureCache, loader: TensorBatches, images: int) -> dict:
    """The real early-exit forward on the first test images agrees with the cache-based scoring."""
    model.eval()
    profile = model.profiles[profile_name("margin", "-0.5pt")]
    model.use_profile(profile.name)
    table = ExitTable.from_cache(model, test, "margin")
    expected = table.exits(profile.thresholds)[:images]
    got, predictions = [], []
    for x, _ in loader:
        out = model(x, return_exits=True)
        got.append(out.exits)
        predictions.append(out.logits.argmax(1))
        if sum(len(g) for g in got) >= images:
            break
    got = torch.cat(got)[:images]
    cached = torch.stack([m.argmax(1) for m in test.margins(model.gates)] + [test.logits.argmax(1)])
    cached_pred = cached[:, :images].gather(0, expected.unsqueeze(0).long())[0]
    model.close_gates()
    return {
        "images": len(got), "profile": profile.name,
        "same_exit": (got.cpu() == expected).double().mean().item(),
        "same_prediction": (torch.cat(predictions)[:images].cpu() == cached_pred).double().mean().item(),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "convnext_atto"])
    parser.add_argument("--out", type=Path, default=None, help="default runs/bench (quick: runs/bench-quick)")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="images per split (smoke runs)")
    parser.add_argument("--quick", action="store_true", help="--limit 512, 5 gate epochs, 1 earlyon epoch")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="training images the gates and earlyon's heads learn from (default: all 55,000)")
    parser.add_argument("--gate-epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--earlyon-epochs", type=int, default=None)
    parser.add_argument("--no-earlyon", action="store_true")
    parser.add_argument("--plain-pass-images", type=int, default=None,
                        help="training images timed for the plain-pass reference, scaled to the split (default all)")
    parser.add_argument("--check-images", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 helps on a busy machine)")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 512
        args.gate_epochs, args.earlyon_epochs = 5, args.earlyon_epochs or 1
    args.out = args.out or Path("runs/bench-quick" if args.quick else "runs/bench")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    for name in args.models:
        run_model(name, args, args.out)
    print(f"compare.py finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
