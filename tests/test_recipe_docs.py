"""docs/recipes.md, run as written: every ```bash block in order, in a fresh folder, on this CPU machine.

```yaml blocks whose first line is ``# save as: NAME`` are written to NAME first (the docs'
Accelerate config file). ```text blocks are output samples and templates, not run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

import timm_dgate
from timm_dgate.core.profiles import Profile

from .helpers import run_launch
from .markdown import fenced_blocks

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "recipes.md"
# Two processes sum gradients in another order than one: float32 round-off, on gates and thresholds alike.
RELATIVE_TOLERANCE = 1e-3
ONE_IMAGE = 1 / 200 + 1e-9  # of the docs' --limit 200: a score within round-off of a threshold may flip


def _blocks(language: str) -> list[str]:
    return fenced_blocks(DOC, language)


def test_every_documented_command_runs_as_written(tmp_path):
    for name in ("recipes", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    for body in _blocks("yaml"):
        saved = re.match(r"# save as: (\S+)\n", body)
        if saved:
            (tmp_path / saved.group(1)).write_text(body)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    outputs = []
    for script in _blocks("bash"):
        commands = [line for line in script.splitlines() if line.startswith((".venv/", "ACCELERATE_USE_CPU=1 .venv/"))]
        assert commands, f"a bash block with no command of this repository:\n{script}"
        done = run_launch(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, timeout=400)
        assert done.returncode == 0, f"{script}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    runs = tmp_path / "runs"
    assert "drop-0.25pt" in timm_dgate.from_pretrained(runs / "fmnist" / "hub").profiles  # after `calibrate`
    _check_two_process_run(runs / "fmnist-2proc", outputs[2])
    _check_same_as_one_process(runs / "fmnist-2proc", runs / "fmnist")
    assert len(list((runs / "fmnist-config" / "cache").glob("train-*of2.safetensors"))) == 2
    assert any(out.count("reusing cached") == 2 for out in outputs)  # the rerun: train and validation
    assert timm_dgate.from_pretrained(runs / "my-images" / "hub").gate_loss == "ce"


def _check_two_process_run(out: Path, stdout: str) -> None:
    """Each rank cached its shard and trained on all; the main rank calibrated, measured and wrote once."""
    assert stdout.count("wrote ") == 1
    gated = timm_dgate.from_pretrained(out / "hub")
    assert list(gated.profiles) == ["drop-0pt", "drop-0.5pt", "drop-1pt", "drop-2pt"]
    assert gated.active_profile == "drop-0pt"
    for profile in gated.profiles.values():
        assert len(profile.thresholds) == gated.num_gates == 3
        assert profile.split.startswith("validation: 0.1 of 'train' held out")
        assert profile.val_accuracy is not None and profile.val_gflops is not None
        assert profile.test["split"] == "test" and 0 <= profile.test["accuracy"] <= 1
    results = json.loads((out / "results.json").read_text())
    assert results["fit"]["num_processes"] == 2 and results["fit"]["num_samples"] == 200  # each image once
    assert results["data"]["validation"]["source"].startswith("0.1 of 'train' held out")
    assert len(list((out / "cache").glob("train-*-rank[01]of2.safetensors"))) == 2
    assert (out / "tradeoff.png").stat().st_size > 0 and "test accuracy" in (out / "results.md").read_text()


def _check_same_as_one_process(two: Path, one: Path) -> None:
    """Two processes on the same data as one: the same gates up to float summation order, and the same profiles.

    Each rank holds half of every split, so this fails if the gradients or the validation cache are
    not combined across processes.
    """
    folders = {"two": two, "one": one}
    gates = {name: load_file(folder / "hub" / "gates.safetensors") for name, folder in folders.items()}
    for key, expected in gates["one"].items():
        assert (gates["two"][key] - expected).abs().max() <= RELATIVE_TOLERANCE * expected.abs().max(), key
    results = {name: json.loads((folder / "results.json").read_text()) for name, folder in folders.items()}
    assert results["two"]["calibration_images"] == results["one"]["calibration_images"] == 200
    assert results["two"]["fit"]["train_accuracy"] == pytest.approx(results["one"]["fit"]["train_accuracy"], abs=0.01)
    profiles = {  # as the fit wrote them (a later `calibrate` block adds profiles to runs/fmnist/hub)
        name: {p["name"]: Profile.from_dict(p) for p in r["profiles"]} for name, r in results.items()
    }
    assert list(profiles["two"]) == list(profiles["one"]) == ["drop-0pt", "drop-0.5pt", "drop-1pt", "drop-2pt"]
    for name, expected in profiles["one"].items():
        got = profiles["two"][name]
        assert got.thresholds == pytest.approx(expected.thresholds, rel=RELATIVE_TOLERANCE), name
        for field in ("val_accuracy", "val_plain_accuracy", "exit_fractions"):  # the same exits, give or take an image
            assert getattr(got, field) == pytest.approx(getattr(expected, field), abs=ONE_IMAGE), f"{name}: {field}"
        assert got.val_gflops == pytest.approx(expected.val_gflops, rel=0.01), name
        assert got.test["accuracy"] == pytest.approx(expected.test["accuracy"], abs=ONE_IMAGE), name
