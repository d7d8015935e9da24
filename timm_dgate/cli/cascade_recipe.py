"""The fit recipe for a cascade (``--cascade resnet10t,resnet50``): members in, a calibrated cascade out.

It builds each member as the one-model recipe builds its model (``recipe.build_model``, one
checkpoint each), gates the members ``--cascade-gates`` names, reads the data once with the
last member's preprocessing (the cascade resizes the batch for each member), caches one pass
per member and split, fits each gated member's gates (``fit_kind``), runs one threshold search
over every exit per target, measures the profiles on the test split and writes the same outputs
as the one-model recipe, with the cascade's folder under ``hub/``. It runs on one process.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..calibration.calibrate import calibrate_targets
from ..errors import InputError
from ..evaluation.evaluate import evaluate
from ..fitting.gate_kinds import fit_kind, gate_kind
from ..models.cascade import Cascade
from ..models.gated import GatedModel, wrap
from ..reports import data_config_summary
from .outputs import RunDescription, write_outputs
from .recipe import RecipeConfig, build_model, wrap_model
from .recipe_data import VALIDATION, RecipeData, data_config


def build_cascade(config: RecipeConfig) -> tuple[Cascade, dict[str, Any]]:
    """The members as the recipe builds a model, gated as ``cascade_gates`` says, and the data's preprocessing
    (the last member's; the flags ``--input-size``/``--img-size`` set the last member's size)."""
    if len(config.cascade) < 2:
        raise InputError(f"--cascade needs two or more models, cheapest first; got {list(config.cascade)}")
    checkpoints = config.cascade_checkpoints or ("",) * len(config.cascade)
    kind = gate_kind(config.gate_kind)
    members: list[GatedModel] = []
    preprocessing: dict[str, Any] = {}
    for i, (name, checkpoint) in enumerate(zip(config.cascade, checkpoints)):
        last = i == len(config.cascade) - 1
        model, _ = build_model(replace(config, model=name, initial_checkpoint=checkpoint, cascade=()))
        preprocessing = data_config(
            model, config.input_size if last else None, config.img_size if last else None, config.mean, config.std
        )
        size = preprocessing["input_size"]
        gated = config.cascade_gates == "all" or (config.cascade_gates == "last" and last)
        if gated:
            members.append(wrap_model(model, config.gates if last else None, size, kind))
        else:
            members.append(wrap(model, [], input_size=size))
    try:
        return Cascade(members), preprocessing
    except ValueError as error:
        raise InputError(f"--cascade {','.join(config.cascade)}: {error}") from error


def run_cascade_fit(config: RecipeConfig) -> int:
    """The whole cascade recipe; see the module doc and docs/recipes.md."""
    model, preprocessing = build_cascade(config)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"cascade {' -> '.join(model.exit_names)}; data read at {tuple(preprocessing['input_size'])} "
        f"({data_config_summary(preprocessing)}), resized per member to {model.input_sizes}"
    )
    data = RecipeData(config.data, preprocessing)
    splits = data.splits()
    caches = {name: model.cache_features(data.loader(split), split.name) for name, split in splits.items()}
    kind = gate_kind(config.gate_kind)
    reports = {}
    for i, member in enumerate(model.members):
        if member.num_gates:
            reports[i] = fit_kind(
                member,
                caches["train"][i],
                kind,
                caches["validation"][i],
                epochs=config.gate_epochs,
                batch_size=config.gate_batch_size,
                reg=config.gate_reg,
                seed=config.seed,
                **({"lr": config.gate_lr} if config.gate_lr else {}),
            )
    calibrate_targets(
        model,
        caches["validation"],
        f"{VALIDATION}{splits['validation'].source}",
        config.max_drop,
        config.max_gflops,
        config.confidence,
        allow_chance_accuracy=config.allow_chance_accuracy,
    )
    test_report = None
    if "test" in splits:
        test_report = evaluate(
            model,
            data.loader(splits["test"]),
            split=config.data.test_split,
            timing_images=config.timing_images,
            record=True,
            allow_chance_accuracy=config.allow_chance_accuracy,
        )
        print(test_report.table())
    run = describe_cascade_run(model, config, caches, reports, preprocessing)
    write_outputs(Path(config.output), model, caches, model.exit_table, run, test_report, config.push_to_hub)
    return 0


def describe_cascade_run(
    model: Cascade,
    config: RecipeConfig,
    caches: dict[str, list],
    reports: dict[int, Any],
    preprocessing: dict[str, Any],
) -> RunDescription:
    """What results.md/json say of this run: the members and their exits, the data, each gated member's fit."""
    gate_accuracy = [
        (f"{i}:{b.name}", a)
        for i, report in reports.items()
        for b, a in zip(model.members[i].boundaries, report.train_accuracy)
    ]
    sizes = "; ".join(f"{name} {len(c[0])} images" for name, c in caches.items())
    members = " -> ".join(config.cascade)
    return RunDescription(
        name=f"cascade {members}",
        curve="cascade (thresholds from validation)",
        title=f"Cascade {members} ({config.cascade_gates} gated, {config.gate_kind} gates)",
        data=f"Data: {config.data.dataset or 'image folder'} at {config.data.data_dir}: {sizes}. Exits in run "
        f"order: {', '.join(model.exit_names)}.",
        gate_accuracy=gate_accuracy,
        results={
            "config": asdict(config),
            "exits": model.exit_names,
            "input_sizes": model.input_sizes,
            "preprocessing": preprocessing,
            "costs": [asdict(c) for c in model.costs.members],
            "plain_gflops": model.costs.backbone / 1e9,
            "fit": {i: asdict(r) for i, r in reports.items()},
        },
    )
