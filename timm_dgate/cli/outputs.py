"""What a recipe run leaves in its output folder: the trade-off plot, results.md and results.json, the Hub folder.

One writer for the one-model recipe and the cascade recipe, so both folders hold the same files in
the same form; each recipe says only what is its own (:class:`RunDescription`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..calibration.curves import measured_tradeoff
from ..core.exit_table import ExitTable
from ..core.profiles import Profile
from ..evaluation.plots import plot_tradeoff
from ..evaluation.results import EvalReport, evaluation_table
from ..models.cascade import Cascade
from ..models.gated import GatedModel
from ..reports import profiles_table

HUB_DIR, PLOT_NAME = "hub", "tradeoff.png"
RESULTS_MD, RESULTS_JSON = "results.md", "results.json"

CacheT = TypeVar("CacheT")


@dataclass(frozen=True)
class RunDescription:
    """How one recipe run describes itself in its outputs, beside the profiles and the test report."""

    name: str  # the model, in the plot's title
    curve: str  # the trade-off curve's label
    title: str  # results.md's heading
    data: str  # results.md's paragraph on the data (and preprocessing)
    gate_accuracy: Sequence[tuple[str, float]]  # train accuracy per gate, as results.md lists it
    results: dict[str, Any]  # results.json up to its profiles and test report


def recipe_results(
    title: str,
    data: str,
    gate_accuracy: Sequence[tuple[str, float]],
    plain_gflops: float,
    profiles: Sequence[Profile],
    test_report: EvalReport | None,
    plot_name: str,
) -> str:
    """The recipe's results.md: what ran on which data, the profiles, the test table and the plot."""
    gates = ", ".join(f"{name} {100 * a:.1f}%" for name, a in gate_accuracy)
    test = (
        f"## Test split `{test_report.split}` ({test_report.num_images} images; it chose nothing)\n\n"
        f"{evaluation_table(test_report)}\n"
        if test_report
        else "No --test-split was given: the numbers above come from the validation split that chose the "
        "thresholds, so they flatter the gates. Measure on held-out data with `timm-dgate eval`.\n"
    )
    return (
        f"# {title}\n\n{data}\n\n"
        f"Gate train accuracy: {gates}. Plain model: {plain_gflops:.4f} GFLOPs per image.\n\n"
        f"{profiles_table(profiles)}\n{test}\n![accuracy against cost]({plot_name})\n"
    )


def write_outputs(
    out: Path,
    model: GatedModel | Cascade,
    caches: Mapping[str, CacheT],
    exit_table: Callable[[CacheT], ExitTable],
    run: RunDescription,
    test_report: EvalReport | None,
    push_to_hub: str | None,
) -> None:
    """The trade-off plot, results.md/json and the model's folder under ``hub/``; pushes to ``push_to_hub`` if given.

    ``caches``: the validation cache and, if there is one, the test cache (by split name), which
    ``exit_table`` turns into tables; the plot and the profile points are measured on test if it is there.
    """
    out.mkdir(parents=True, exist_ok=True)
    measured = "test" if "test" in caches else "validation"
    val_table, table = exit_table(caches["validation"]), exit_table(caches[measured])
    profiles = list(model.profiles.values())
    plot_tradeoff(
        {run.curve: measured_tradeoff(val_table, table)},
        (table.plain_accuracy, model.costs.backbone / 1e9),
        out / PLOT_NAME,
        split=measured,
        profiles=[(p.name, *table.evaluate(p.thresholds)[:2]) for p in profiles],
        title=f"{run.name}: accuracy against cost on {measured}",
    )
    gated = isinstance(model, GatedModel)
    card = {"tradeoff_plot": out / PLOT_NAME} if gated else {}  # a cascade's model card shows no plot
    hub = model.save_pretrained(out / HUB_DIR, **card)
    results = {
        **run.results,
        "profiles": [p.to_dict() for p in profiles],
        "test": asdict(test_report) if test_report else None,
    }
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2, default=str))
    (out / RESULTS_MD).write_text(recipe_results(
        run.title, run.data, run.gate_accuracy, model.costs.backbone / 1e9, profiles, test_report, PLOT_NAME
    ))
    print(f"wrote {out / RESULTS_MD}, {out / RESULTS_JSON}, {out / PLOT_NAME}; "
          f"{'gated model' if gated else 'cascade'} in {hub} (timm_dgate.from_pretrained({str(hub)!r}))")
    if push_to_hub:
        model.push_to_hub(push_to_hub, **card)
        print(f"pushed to https://huggingface.co/{push_to_hub}")
