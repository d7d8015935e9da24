"""The fit recipe: a timm classifier and a data set in; a calibrated gated model, its results and plots out.

One implementation behind ``recipes/fit.py`` and ``timm-dgate fit``, run from a
:class:`RecipeConfig`. It runs as one process or many under ``accelerate launch``: every
process caches the features of its shard of each split, the gates train on the training shards
with gradients summed across processes (so every rank ends with the same gates), and the
validation and test caches are gathered so the main process calibrates, evaluates and writes
the output folder. Cache files are named by what made them (model, weights, data, input size,
gates, rank), so a rerun that changes only gate or calibration settings skips the backbone.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..calibration.calibrate import calibrate_targets
from ..core.cache import FeatureCache, cache_features, cache_key
from ..core.exit_table import ExitTable
from ..errors import InputError
from ..evaluation.evaluate import evaluate
from ..fitting.distributed import Reducer
from ..fitting.gate_kinds import DEFAULT_GATE_KIND, GateKind, fit_kind, gate_kind
from ..fitting.training import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, FitReport
from ..hub.names import BACKBONE_CONFIG_NAME
from ..models.gated import GatedModel, wrap
from ..reports import data_config_summary
from ..version import __version__
from .outputs import RunDescription, write_outputs
from .recipe_data import VALIDATION, DataConfig, RecipeData, SplitData, data_config

CACHE_DIR = "cache"


@dataclass
class RecipeConfig:
    """Everything one recipe run needs (the flags of ``recipes/fit.py``, typed)."""

    model: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    pretrained: bool = False
    initial_checkpoint: str = ""
    num_classes: int | None = None
    in_chans: int | None = None
    input_size: tuple[int, int, int] | None = None
    img_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    gates: tuple[str, ...] | None = None
    gate_kind: str = DEFAULT_GATE_KIND
    gate_epochs: int = DEFAULT_EPOCHS
    gate_batch_size: int | None = DEFAULT_BATCH_SIZE
    gate_lr: float | None = None
    gate_reg: float = 1e-4
    max_drop: tuple[float, ...] = (0, 0.5, 1, 2)
    max_gflops: tuple[float, ...] = ()
    confidence: float | None = None
    output: str = "runs/fit"
    cache_dir: str | None = None
    timing_images: int = 1024
    push_to_hub: str | None = None
    allow_chance_accuracy: bool = False
    cascade: tuple[str, ...] = ()  # members, cheapest first, instead of model (timm_dgate.cli.cascade_recipe)
    cascade_checkpoints: tuple[str, ...] = ()
    cascade_gates: str = "last"

    def __post_init__(self) -> None:
        if self.initial_checkpoint and not Path(self.initial_checkpoint).is_file():
            raise InputError(f"--initial-checkpoint {self.initial_checkpoint} is not a file")
        for path in self.cascade_checkpoints:
            if path and not Path(path).is_file():
                raise InputError(f"--cascade-checkpoints: {path} is not a file")

    @classmethod
    def from_args(cls, args: Any) -> RecipeConfig:
        """From a parsed command line (``timm_dgate.cli.arguments.add_fit_arguments``)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "data"}
        for key in ("input_size", "mean", "std", "gates", "max_drop", "max_gflops"):
            if values[key] is not None:
                values[key] = tuple(values[key])
        values["model"] = values["model"] or ""
        for key in ("cascade", "cascade_checkpoints"):
            values[key] = tuple(values[key] or ())
        return cls(data=DataConfig.from_args(args), **values)

    @property
    def seed(self) -> int:
        return self.data.seed

    def weights_identity(self) -> str:
        """What the backbone's weights are, for cache names: a checkpoint's hash, a pretrained tag or the init seed."""
        if self.initial_checkpoint:
            digest = hashlib.sha256()
            with open(self.initial_checkpoint, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return f"checkpoint sha256 {digest.hexdigest()}"
        return "pretrained" if self.pretrained else f"random init, seed {self.seed}"


def build_model(config: RecipeConfig) -> tuple[nn.Module, str]:
    """The timm model as train.py would build it, weights loaded, in eval mode (same init on every rank), and
    where its ``pretrained_cfg`` (so its default preprocessing) came from.

    timm's ``load_checkpoint`` reads weights only. A checkpoint saved in timm's layout
    (``save_for_hf``) has a ``config.json`` beside it whose ``pretrained_cfg`` says how those
    weights want their images; it replaces timm's default for the architecture, which
    describes timm's own weights (often ImageNet's 224 px and mean/std).
    """
    kwargs = {k: v for k, v in (("num_classes", config.num_classes), ("in_chans", config.in_chans)) if v is not None}
    torch.manual_seed(config.seed)
    try:
        model = timm.create_model(config.model, pretrained=config.pretrained, **kwargs)
    except (RuntimeError, ValueError, OSError, KeyError) as error:
        close = difflib.get_close_matches(config.model, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"timm could not create {config.model!r}: {error}{hint}") from error
    cfg = model.pretrained_cfg
    name = ".".join(str(part) for part in (cfg.get("architecture"), cfg.get("tag")) if part)
    origin = (
        f"timm's pretrained_cfg of the --pretrained weights, {name}" if config.pretrained
        else f"timm's defaults for {config.model} (pretrained_cfg {name}, made for timm's own weights)"
    )
    if config.initial_checkpoint:
        try:
            timm.models.load_checkpoint(model, config.initial_checkpoint)
        except (RuntimeError, ValueError, OSError, KeyError) as error:
            raise InputError(f"cannot load --initial-checkpoint {config.initial_checkpoint}: {error}") from error
        saved = Path(config.initial_checkpoint).with_name(BACKBONE_CONFIG_NAME)
        saved_cfg = _saved_pretrained_cfg(saved)
        if saved_cfg is not None:
            model.pretrained_cfg = {"architecture": cfg.get("architecture"), **saved_cfg}
            origin = f"the checkpoint's pretrained_cfg in {saved}"
    return model.eval(), origin


def _saved_pretrained_cfg(path: Path) -> dict[str, Any] | None:
    """``pretrained_cfg`` of a timm ``config.json``; None when there is no such file or it is another kind."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}, beside --initial-checkpoint, is not valid JSON: {error}") from error
    cfg = saved.get("pretrained_cfg") if isinstance(saved, dict) else None
    return cfg if isinstance(cfg, dict) else None


def preprocessing_source(config: RecipeConfig, origin: str) -> str:
    """Which flags set the preprocessing, and where the rest came from (``origin``, from :func:`build_model`)."""
    flags = [
        flag for flag, value in (("--input-size", config.input_size), ("--img-size", config.img_size),
                                 ("--mean", config.mean), ("--std", config.std))
        if value
    ]
    return f"{', '.join(flags)} from flags; the rest from {origin}" if flags else f"from {origin}"


def wrap_model(
    model: nn.Module, gates: tuple[str, ...] | None, input_size: tuple[int, ...], kind: GateKind
) -> GatedModel:
    """``wrap`` with CLI-style gate positions (names, integers as strings, or ``blocks`` alone) and ``kind``'s head."""
    positions: list[str | int] | str | None = None
    if gates == ("blocks",) or gates == ["blocks"]:
        positions = "blocks"
    elif gates:
        positions = [int(g) if g.lstrip("-").isdigit() else g for g in gates]
    try:
        return wrap(
            model, positions, input_size=input_size, gate_head=kind.head, gate_head_options=kind.head_options
        )
    except ValueError as error:
        raise InputError(str(error)) from error


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


def run_fit(config: RecipeConfig) -> int:
    """The whole recipe; see the module doc and docs/recipes.md."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))
    reducer = Reducer(accelerator)
    say = accelerator.print
    model, origin = build_model(config)
    if not (config.pretrained or config.initial_checkpoint):
        say("warning: no --pretrained or --initial-checkpoint, so the backbone has random weights")
    preprocessing = data_config(model, config.input_size, config.img_size, config.mean, config.std)
    source = preprocessing_source(config, origin)
    say(f"preprocessing: {data_config_summary(preprocessing)} ({source})")
    kind = gate_kind(config.gate_kind)
    gated = wrap_model(model, config.gates, preprocessing["input_size"], kind).to(accelerator.device)
    data = RecipeData(config.data, preprocessing)
    splits = data.splits()
    for split in splits.values():
        say(f"{split.name}: {len(split)} images ({split.source})")
    if not config.data.val_split:
        say("thresholds are chosen on the held-out validation images only; gates never train on them")
    say(f"gates after {', '.join(b.name for b in gated.boundaries)} at input size {tuple(preprocessing['input_size'])}")

    out = Path(config.output)
    identity = {
        "model": config.model, "weights": config.weights_identity(), "num_classes": gated.num_classes,
        "data_config": preprocessing, "gates": [b.module for b in gated.boundaries], "pool": gated.pool,
        "batch_size": config.data.batch_size, "timm_dgate": __version__,
    }
    store = FeatureStore(Path(config.cache_dir) if config.cache_dir else out / CACHE_DIR, identity, accelerator)
    caches = {
        name: store.features(gated, accelerator.prepare_data_loader(data.loader(split)), split)
        for name, split in splits.items()
    }
    # every process holds all held-out rows, so survivor refits pick the same thresholds on every rank
    held_out = {name: reducer.gather_cache(caches[name]) for name in ("validation", "test") if name in caches}
    report = fit_kind(
        gated, caches["train"], kind, held_out["validation"], epochs=config.gate_epochs,
        batch_size=config.gate_batch_size, reg=config.gate_reg, accelerator=accelerator, seed=config.seed,
        progress=accelerator.is_main_process,
        **({"lr": config.gate_lr} if config.gate_lr else {}),
    )
    say(f"{config.gate_kind} gates fitted on {report.num_samples} images by {report.num_processes} process(es); "
        "train accuracy per gate: " + ", ".join(f"{100 * a:.1f}%" for a in report.train_accuracy))
    if not accelerator.is_main_process:
        return 0
    calibrate_targets(
        gated, held_out["validation"], f"{VALIDATION}{splits['validation'].source}",
        config.max_drop, config.max_gflops, config.confidence, allow_chance_accuracy=config.allow_chance_accuracy,
    )
    test_report = None
    if "test" in splits:
        test_report = evaluate(gated, data.loader(splits["test"]), split=config.data.test_split,
                               timing_images=config.timing_images, record=True,
                               allow_chance_accuracy=config.allow_chance_accuracy)
        say(test_report.table())
    recorded = {"data_config": preprocessing, "source": source}
    run = describe_run(gated, config, splits, report, held_out, recorded)
    write_outputs(out, gated, held_out, partial(ExitTable.from_cache, gated), run, test_report, config.push_to_hub)
    return 0


def describe_run(
    gated: GatedModel,
    config: RecipeConfig,
    splits: dict[str, SplitData],
    report: FitReport,
    held_out: dict[str, FeatureCache],
    preprocessing: dict[str, Any],
) -> RunDescription:
    """What results.md/json say of this run: the data, the preprocessing, the gates and their fit.

    ``preprocessing``: the timm data config every split was read with (``data_config``) and where it came from
    (``source``).
    """
    sizes = {name: {"images": len(s), "source": s.source} for name, s in splits.items()}
    data = "; ".join(f"{name} {s['images']} images ({s['source']})" for name, s in sizes.items())
    return RunDescription(
        name=config.model,
        curve=f"{config.gate_kind} gates (thresholds from validation)",
        title=f"{config.model} with {config.gate_kind} decision gates",
        data=f"Data: {config.data.dataset or 'image folder'} at {config.data.data_dir}: {data}.\n\n"
        f"Preprocessing: {data_config_summary(preprocessing['data_config'])} ({preprocessing['source']}).",
        gate_accuracy=[(b.name, a) for b, a in zip(gated.boundaries, report.train_accuracy)],
        results={
            "config": asdict(config), "data": sizes, "preprocessing": preprocessing,
            "gates": [b.name for b in gated.boundaries],
            "calibration_images": len(held_out["validation"]),  # every process's shard, gathered
            "plain_gflops": gated.costs.backbone / 1e9, "fit": asdict(report),
        },
    )
