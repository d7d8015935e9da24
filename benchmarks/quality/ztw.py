"""Zero Time Waste's two exit ideas on the frozen backbone's cached features, against hinge, CE and MLP gates.

Issue 12, section 2: *cascaded inputs* (Wójcik et al. 2021, "Zero Time Waste"): gate k reads its
pooled features concatenated with the logits of gates 0..k-1 (fit first, in order, and frozen);
*ensembled exits*: exit k decides with ``softmax(sum_j w_kj * log_softmax(z_j) + b_k)`` over gates
0..k, ``w_kj >= 0`` and a per-class bias ``b_k`` fit by cross-entropy on the training cache once
the gates are fit (ZTW's normalised weighted geometric mean). Both are measured alone, for linear
and MLP gates, and combined, beside hinge gates (the paper), linear CE gates with max-softmax
(Shallow-Deep Networks) and MLP gates (the recipe's default), all on one train / validation /
test cache of the same backbone, with the library's own trainer (``GateTrainer``: standardised
features, mini-batch Adam, cosine schedule; a cascaded gate k >= 1 starts from the plain gate k
with zero weight on the logits and is fine-tuned for ``--cascade-epochs`` at ``--cascade-lr``,
gate 0 is the plain gate) and its own threshold search
(``search_thresholds``, coordinate, the targets of ``DROPS``). Thresholds come from validation
only; every reported number is on the 10,000 test images.

Costs are honest for the runtime these exits need: gate k of a cascade, and exit k of an
ensemble, need the outputs of every earlier gate, so an earlier gate runs (and is paid by every
sample that passes it) whenever any later gate is open, even when its own threshold is +inf and
it never lets anybody out. A cascaded gate's own FLOPs are counted on its wider input, and an
ensemble's combination (``k + 1`` weighted log-softmax vectors) is counted at 2 FLOPs per
multiply-add like everything else.

    .venv/bin/python benchmarks/quality/ztw.py --model resnet18 --gates-from runs/bench/resnet18 --threads 1

writes ``<out>/resnet18/ztw.json`` (default out: ``runs/bench/ztw``) and prints the table; the
numbers and what they mean are in docs/concepts.md ("Zero Time Waste's exits"). ``--gates-from``
loads the hinge, CE and MLP gates compare.py fit (else they are fit here with ``fit_kind``). On a
busy machine keep ``--threads 1``: with two threads the fits ran about ten times slower. The
three caches are kept in ``--cache-dir`` (default ``runs/caches``) and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `benchmarks.*`

from benchmarks.common import CACHE_DIR, load_trained, split_caches
from timm_dgate import FeatureCache, wrap
from timm_dgate.calibration.curves import measured_tradeoff
from timm_dgate.calibration.goals import Target
from timm_dgate.calibration.search import search_thresholds
from timm_dgate.core.costs import GateCosts, count_flops
from timm_dgate.core.exit_table import ExitTable
from timm_dgate.core.gates import DecisionGate, gate_head, head_for_hidden
from timm_dgate.core.scores import exit_score
from timm_dgate.demo.pipeline import DROPS
from timm_dgate.fitting.distributed import Reducer
from timm_dgate.fitting.gate_kinds import GATE_KINDS, fit_kind
from timm_dgate.fitting.trainer import GateTrainer, feature_stats
from timm_dgate.fitting.training import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, _fit_cached

MLP_HIDDEN = GATE_KINDS["mlp"].head_options["hidden"]
CURVE_FLOORS = {"iso": 0.001, "-0.5pt": 0.005}  # test accuracy floors (as DROPS) for the descriptive curve read
GROUPS = ("baselines", "ensembles", "cascade-ce", "cascade-mlp")


def library_gates(kind: str, train: FeatureCache, args: argparse.Namespace) -> nn.ModuleList:
    """``kind``'s gates as compare.py made them: loaded from its ``<kind>_gates.pt``, else fit by ``fit_kind``."""
    spec = GATE_KINDS[kind]
    saved = args.gates_from / f"{kind}_gates.pt" if args.gates_from else None
    if saved and saved.exists():  # the very gates compare.py fit and measured, on the same training cache
        num_classes = int(train.logits.shape[1])
        gates = nn.ModuleList(
            DecisionGate(f.shape[1], num_classes, "NCHW", head=spec.head, head_options=spec.head_options)
            for f in train.features
        )
        gates.load_state_dict(torch.load(saved))
        print(f"  {kind}: gates loaded from {saved}", flush=True)
        return gates.eval()
    model = wrap(
        load_trained(args.model, args.backbones),
        input_size=(1, args.input_size, args.input_size),
        gate_head=spec.head,
        gate_head_options=spec.head_options,
    )
    start = time.perf_counter()
    fit_kind(model, train, spec, epochs=args.epochs, progress=False)
    print(f"  fit {kind}: {time.perf_counter() - start:.0f}s", flush=True)
    return model.gates.eval()


class ChainedGateCosts(GateCosts):
    """One model's costs when a gate's output feeds later gates or exits: it runs whenever any later gate is open.

    Not the library's ``CascadeCosts`` (the members of a cascade of models): here the gates of one
    backbone are chained, as ZTW's cascaded inputs and ensembles need.
    ``combine[k]`` is extra work paid only by a sample that is scored at exit k (an ensemble's
    combination of gates 0..k); it is paid at open exits only.
    """

    combine: tuple[float, ...]

    def __init__(self, to_gate, gate, backbone, combine=None):
        super().__init__(tuple(to_gate), tuple(gate), float(backbone))
        object.__setattr__(self, "combine", tuple(combine or (0.0,) * len(gate)))

    def exit_costs(self, open_gates=None) -> torch.Tensor:
        if open_gates is None:
            open_gates = [True] * self.num_gates
        runs = [any(open_gates[k:]) for k in range(self.num_gates)]  # gate k feeds itself or a later open gate
        passed = torch.tensor([g if r else 0.0 for g, r in zip(self.gate, runs)], dtype=torch.float64).cumsum(0)
        combine = torch.tensor([c if o else 0.0 for c, o in zip(self.combine, open_gates)], dtype=torch.float64)
        at_gates = torch.tensor(self.to_gate, dtype=torch.float64) + passed + combine
        return torch.cat([at_gates, (self.backbone + passed[-1]).reshape(1)])


def head_layers(in_features: int, num_classes: int, hidden: int) -> nn.Sequential:
    """A gate's layers after pooling: the linear head (``hidden=0``) or the ``mlp`` head with ``hidden`` units."""
    name, options = head_for_hidden(hidden)
    return gate_head(name).layers(in_features, num_classes, options)


def linear_flops(in_features: int, num_classes: int, hidden: int) -> float:
    """What the gate's layers after pooling cost (FlopCounterMode, as every other gate's count)."""
    return count_flops(head_layers(in_features, num_classes, hidden), torch.zeros(1, in_features))


@dataclass
class Exits:
    """One method's per-gate outputs on val and test, how to score them, and its costs."""

    val: list[torch.Tensor]
    test: list[torch.Tensor]
    score: str
    costs: GateCosts


def fit_heads(
    features: list[torch.Tensor],
    train: FeatureCache,
    hidden: int,
    epochs: int,
    seed: int = 0,
    init: list[nn.Sequential | None] | None = None,
    lr: float | None = None,
) -> list:
    """CE gates on ``features`` (rows of ``train``) with the library's trainer: the ``ce`` / ``mlp`` kinds' loss,
    lr, mini-batches and schedule.

    ``init[i]``: fitted layers to start gate i from, on the first columns of its features (the
    others start at zero weight), so the fit begins exactly where that gate ended.
    """
    torch.manual_seed(seed)
    labels = train.labels
    gates = [_Layers(head_layers(f.shape[1], int(labels.max()) + 1, hidden)) for f in features]
    reducer = Reducer(None)
    device = torch.device("cpu")
    mean, std, total = feature_stats([(features, labels)], reducer, device)
    lr = lr or gate_head(head_for_hidden(hidden)[0]).default_lr
    trainer = GateTrainer(nn.ModuleList(gates), mean, std, "ce", lr, 1e-4, reducer, device)
    for head, start, m, sd in zip(trainer.heads, init or [], mean, std):
        if start is not None:
            warm_start(head, start, m, sd)
    rows = FeatureCache(features, train.logits, labels, train.split, train.fingerprints)
    _fit_cached(trainer, rows, 0.0, None, epochs, -(-total // DEFAULT_BATCH_SIZE), "", progress=False)
    trainer.fold_into(nn.ModuleList(gates))
    return [g.seq.eval() for g in gates]


@torch.no_grad()
def warm_start(head: nn.Sequential, start: nn.Sequential, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Set a trainer's working layers to ``start``'s function, new trailing input columns at zero weight.

    The trainer computes ``linear(x - mean, W_t / std, b_t)`` (``GateTrainer.margins``) and ``start``
    ``W x + b`` on the first columns of ``x``: so ``W_t = [W, 0] * std`` and ``b_t = b + [W, 0] @ mean``.
    """
    first, source = head[0], start[0]
    weight = torch.zeros_like(first.weight)
    weight[:, : source.in_features] = source.weight.float()
    first.weight.copy_(weight * std)
    first.bias.copy_(source.bias.float() + weight @ mean)
    for mine, theirs in zip(head[1:], start[1:]):
        mine.load_state_dict(theirs.state_dict())


class _Layers(nn.Module):
    """What ``GateTrainer`` needs of a gate: ``layers()``, here a plain head's layers."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.seq = seq

    def layers(self) -> nn.Sequential:
        return self.seq


@torch.no_grad()
def apply(heads: list, features: list[torch.Tensor]) -> list[torch.Tensor]:
    return [h(f.float()) for h, f in zip(heads, features)]


def fit_cascade(
    train: FeatureCache,
    hidden: int,
    epochs: int,
    plain: list[nn.Sequential],
    previous_only: bool = False,
    lr: float | None = None,
) -> list:
    """Gate k on ``[pooled_k, z_0, .., z_{k-1}]`` (or only ``z_{k-1}``), fit in order, earlier gates frozen.

    ``plain``: the plain gates of the same kind. Gate 0 reads no logits, so it is the plain gate 0;
    gate k starts from plain gate k with zero weight on the logits, so the fit begins where the plain
    gate ended and a cascade gate is never worse than it on the training loss.
    """
    heads, outputs = [plain[0]], [apply([plain[0]], [train.features[0]])[0]]
    for k in range(1, len(train.features)):
        inputs = torch.cat([train.features[k], *(outputs[-1:] if previous_only else outputs)], 1)
        (head,) = fit_heads([inputs], train, hidden, epochs, seed=k, init=[plain[k]], lr=lr)
        heads.append(head)
        outputs.append(apply([head], [inputs])[0])
        before = (apply([plain[k]], [train.features[k]])[0].argmax(1) == train.labels).double().mean()
        after = (outputs[-1].argmax(1) == train.labels).double().mean()
        print(
            f"    cascade gate {k} ({'mlp' if hidden else 'linear'}): train accuracy {before:.4f} -> {after:.4f}",
            flush=True,
        )
    return heads


@torch.no_grad()
def cascade_outputs(heads: list, cache: FeatureCache, previous_only: bool = False) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    for head, feats in zip(heads, cache.features):
        extra = outputs[-1:] if previous_only else outputs
        outputs.append(head(torch.cat([feats.float(), *extra], 1)))
    return outputs


class Ensemble(nn.Module):
    """Exit k: ``log_softmax(sum_{j<=k} w_kj * log_softmax(z_j) + b_k)``, ``w_kj >= 0`` (ZTW's geometric mean)."""

    def __init__(self, num_gates: int, num_classes: int):
        super().__init__()
        self.w = nn.Parameter(torch.eye(num_gates))  # start: each exit is its own gate
        self.b = nn.Parameter(torch.zeros(num_gates, num_classes))

    def exit(self, k: int, log_probs: list[torch.Tensor]) -> torch.Tensor:
        mixed = sum(self.w[k, j] * log_probs[j] for j in range(k + 1)) + self.b[k]
        return mixed.log_softmax(1)

    def forward(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        log_probs = [z.float().log_softmax(1) for z in outputs]
        return [self.exit(k, log_probs) for k in range(len(outputs))]


def fit_ensemble(outputs: list[torch.Tensor], labels: torch.Tensor, steps: int = 300) -> Ensemble:
    """Weights and biases by cross-entropy on the training gates' outputs; projected Adam keeps ``w >= 0``.

    Convex in ``(w, b)`` (a log-softmax of a linear function of them), so the start does not matter.
    """
    ensemble = Ensemble(len(outputs), outputs[0].shape[1])
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=0.05)
    log_probs = [z.detach().float().log_softmax(1) for z in outputs]
    mask = torch.ones(len(outputs), len(outputs)).tril()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(nn.functional.nll_loss(ensemble.exit(k, log_probs), labels) for k in range(len(outputs)))
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            ensemble.w.clamp_(min=0).mul_(mask)
    return ensemble.eval()


def ensemble_costs(gate: list[float], base: GateCosts, num_classes: int) -> ChainedGateCosts:
    """An ensemble's exit k combines k + 1 vectors: one multiply-add per class and gate, plus the bias."""
    combine = [2.0 * (k + 1) * num_classes for k in range(len(gate))]
    return ChainedGateCosts(base.to_gate, gate, base.backbone, combine)


def table(outputs: list[torch.Tensor], cache: FeatureCache, score: str, costs: GateCosts) -> ExitTable:
    """The exit table of given gate outputs, built like ``ExitTable.from_cache``."""
    scores = torch.stack([exit_score(m, score) for m in outputs]).double()
    predictions = [m.argmax(1) for m in outputs] + [cache.logits.argmax(1)]
    correct = torch.stack([p == cache.labels for p in predictions])
    return ExitTable(scores, correct, costs)


def measure(exits: Exits, caches: dict[str, FeatureCache]) -> dict:
    """Per target of ``DROPS``: thresholds searched on validation, scored on test."""
    val = table(exits.val, caches["val"], exits.score, exits.costs)
    test = table(exits.test, caches["test"], exits.score, exits.costs)
    base = exits.costs.backbone
    points = {}
    for label, drop in DROPS.items():
        thresholds = search_thresholds(val, Target(max_drop=drop))
        val_acc, val_gflops, _ = val.evaluate(thresholds)
        accuracy, gflops, fractions = test.evaluate(thresholds)
        points[label] = {
            "thresholds": [t if math.isfinite(t) else str(t) for t in thresholds],
            "val_accuracy": val_acc,
            "val_gflops": val_gflops,
            "accuracy": accuracy,
            "gflops": gflops,
            "delta_pt": 100 * (accuracy - test.plain_accuracy),
            "flops_saved": 100 * (1 - gflops * 1e9 / base),
            "exit_fractions": fractions.tolist(),
        }
    gate_acc = [(o.argmax(1) == caches["test"].labels).double().mean().item() for o in exits.test]
    curve = measured_tradeoff(val, test)  # the front chosen on validation, scored on test (compare.py's curve)
    at_equal = {  # descriptive, not deployable: the best point of that curve at or above each test accuracy
        label: max(
            (100 * (1 - g * 1e9 / base) for a, g in curve if a >= test.plain_accuracy - drop - 1e-12),
            default=None,
        )
        for label, drop in CURVE_FLOORS.items()
    }
    return {
        "curve": curve,
        "saved_at_test_accuracy": at_equal,
        "score": exits.score,
        "gate_flops": list(exits.costs.gate),
        "combine_flops": list(getattr(exits.costs, "combine", [])),
        "test_gate_accuracy": gate_acc,
        "points": points,
    }


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cached, costs = split_caches(args.model, args.backbones, args.cache_dir, args.input_size)
    if args.limit:  # smoke runs: the first rows of every cache
        cached = {
            k: FeatureCache(
                [f[: args.limit] for f in c.features], c.logits[: args.limit], c.labels[: args.limit], c.split, None
            )
            for k, c in cached.items()
        }
    train, num_classes = cached["train"], int(cached["train"].logits.shape[1])
    val_test = ("val", "test")
    methods: dict[str, Exits] = {}
    seconds: dict[str, float] = {}

    def timed(key: str, fn):
        start = time.perf_counter()
        value = fn()
        seconds[key] = time.perf_counter() - start
        print(f"  {key}: {seconds[key]:.0f}s", flush=True)
        return value

    # the library's kinds, as compare.py fit and measured them
    plain = {}
    widths = [f.shape[1] for f in train.features]
    mlp_gate = [linear_flops(w, num_classes, MLP_HIDDEN) for w in widths]
    lin_gate = list(costs.gate)
    group = args.only
    needed = {"baselines": ("hinge", "ce", "mlp"), "ensembles": ("ce", "mlp"), "cascade-ce": ("ce",)}
    for kind in needed.get(group, ("hinge", "ce", "mlp") if group == "all" else ("mlp",)):
        gates = library_gates(kind, train, args)
        keys = val_test if kind == "hinge" else ("train", *val_test)  # train: for ensembles and cascades
        plain[kind] = {key: cached[key].margins(gates) for key in keys} | {"gates": gates}
        kind_costs = GateCosts(costs.to_gate, tuple(mlp_gate if kind == "mlp" else lin_gate), costs.backbone)
        methods[kind] = Exits(
            plain[kind]["val"], plain[kind]["test"], "margin" if kind == "hinge" else "softmax", kind_costs
        )

    result = {
        "model": args.model,
        "cascade_epochs": args.cascade_epochs,
        "cascade_lr": args.cascade_lr,
        "sizes": {k: len(c) for k, c in cached.items()},
        "plain": {
            "val_accuracy": (cached["val"].logits.argmax(1) == cached["val"].labels).double().mean().item(),
            "accuracy": (cached["test"].logits.argmax(1) == cached["test"].labels).double().mean().item(),
            "gflops": costs.backbone / 1e9,
        },
        "seconds": seconds,
        "methods": {},
    }
    path = args.out / args.model / ("ztw.json" if group == "all" else f"ztw-{group}.json")
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(name: str, exits: Exits) -> None:
        """Measure ``name`` now and rewrite the JSON: a slow run keeps what it has measured so far."""
        result["methods"][name] = measure(exits, cached)
        path.write_text(json.dumps(result, indent=1))
        print_row(name, result["methods"][name], flush=True)

    print_header(result)
    for name, exits in methods.items() if group in ("all", "baselines") else ():
        record(name, exits)
    for kind, gate in (("mlp", mlp_gate), ("ce", lin_gate)) if group in ("all", "ensembles") else ():
        ensemble = timed(
            f"fit ensemble over {kind}",
            lambda k=kind: fit_ensemble(plain[k]["train"], train.labels, args.ensemble_steps),
        )
        print(f"    weights {ensemble.w.detach().numpy().round(3).tolist()}", flush=True)
        with torch.no_grad():
            out = {key: ensemble(plain[kind][key]) for key in val_test}
        record(f"ensemble {kind}", Exits(out["val"], out["test"], "softmax", ensemble_costs(gate, costs, num_classes)))

    for hidden, label in ((0, "ce"), (MLP_HIDDEN, "mlp")):
        if group not in ("all", f"cascade-{label}"):
            continue
        for previous_only in (False, True) if hidden and args.previous_only else (False,):
            name = f"cascade {label}" + (" (previous gate only)" if previous_only else "")
            layers = [g.layers() for g in plain[label]["gates"]]
            heads = timed(
                f"fit {name}",
                lambda h=hidden, p=previous_only, g=layers: fit_cascade(
                    train, h, args.cascade_epochs, g, p, args.cascade_lr
                ),
            )
            extra = [num_classes * (min(k, 1) if previous_only else k) for k in range(len(widths))]
            gate = [linear_flops(w + e, num_classes, hidden) for w, e in zip(widths, extra)]
            out = {key: cascade_outputs(heads, cached[key], previous_only) for key in ("train", *val_test)}
            chained = ChainedGateCosts(costs.to_gate, gate, costs.backbone)
            record(name, Exits(out["val"], out["test"], "softmax", chained))
            if not previous_only:
                ensemble = timed(
                    f"fit ensemble over {name}",
                    lambda o=out: fit_ensemble(o["train"], train.labels, args.ensemble_steps),
                )
                print(f"    weights {ensemble.w.detach().numpy().round(3).tolist()}", flush=True)
                with torch.no_grad():
                    ens = {key: ensemble(out[key]) for key in val_test}
                exits = Exits(ens["val"], ens["test"], "softmax", ensemble_costs(gate, costs, num_classes))
                record(f"cascade + ensemble {label}", exits)
    return result


def print_header(result: dict) -> None:
    print(
        f"\n{result['model']}: plain test accuracy {100 * result['plain']['accuracy']:.2f}%, "
        f"{result['plain']['gflops']:.4f} GFLOPs. Cell: test accuracy change (pt) / FLOPs saved (%)"
    )
    print(
        f"{'method':34s}"
        + "".join(f"{label:>16s}" for label in DROPS)
        + "   test gate accuracy (%)   curve: saved at test accuracy >= plain - 0.1 / 0.5 pt"
    )


def print_row(name: str, m: dict, flush: bool = False) -> None:
    cells = "".join(f"{m['points'][t]['delta_pt']:+7.2f} / {m['points'][t]['flops_saved']:5.1f}" for t in DROPS)
    gates = " ".join(f"{100 * a:.1f}" for a in m["test_gate_accuracy"])
    curve = " ".join("-" if v is None else f"{v:.1f}" for v in m.get("saved_at_test_accuracy", {}).values())
    print(f"{name:34s}{cells}   {gates}   curve: {curve}", flush=flush)


def print_table(result: dict) -> None:
    print_header(result)
    for name, m in result["methods"].items():
        print_row(name, m)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--backbones", type=Path, default=Path("runs/backbones"))
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ztw"))
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs of a library kind fit here")
    parser.add_argument(
        "--cascade-epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help="epochs of each cascaded gate's fine-tune (warm-started from the plain gate)",
    )
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--gates-from",
        type=Path,
        default=None,
        help="compare.py's output folder for this model: load its <kind>_gates.pt instead of fitting",
    )
    parser.add_argument(
        "--previous-only",
        action="store_true",
        help="also the cascade variant where gate k reads only gate k-1's logits (ZTW's own wiring)",
    )
    parser.add_argument("--limit", type=int, default=None, help="rows of each cache (smoke runs)")
    parser.add_argument("--ensemble-steps", type=int, default=300, help="Adam steps of each ensemble's fit")
    parser.add_argument(
        "--cascade-lr",
        type=float,
        default=None,
        help="Adam lr of the cascaded gates' fine-tune (default: the kind's gate head's default_lr)",
    )
    parser.add_argument(
        "--only",
        choices=("all", *GROUPS),
        default="all",
        help="one group of methods, into ztw-<group>.json (groups run in parallel; --merge joins them)",
    )
    parser.add_argument("--merge", action="store_true", help="join the groups' JSON into ztw.json and print it")
    parser.add_argument("--cache-only", action="store_true", help="make the caches and stop")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        merged: dict = {}
        for group in GROUPS:
            part = args.out / args.model / f"ztw-{group}.json"
            if part.exists():
                loaded = json.loads(part.read_text())
                settings = {k: loaded.pop(k) for k in ("epochs", "cascade_epochs", "cascade_lr") if k in loaded}
                merged = {
                    **loaded,
                    "methods": {**merged.get("methods", {}), **loaded["methods"]},
                    "seconds": {**merged.get("seconds", {}), **loaded["seconds"]},
                    "groups": {**merged.get("groups", {}), group: settings},
                }
        (args.out / args.model / "ztw.json").write_text(json.dumps(merged, indent=1))
        print_table(merged)
        return
    if args.cache_only:
        split_caches(args.model, args.backbones, args.cache_dir, args.input_size)
        return
    run(args)


if __name__ == "__main__":
    main()
