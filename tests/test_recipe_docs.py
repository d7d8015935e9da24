"""docs/recipes.md, run as written: every ```bash block in order, in a fresh folder, on this CPU machine.

```yaml blocks whose first line is ``# save as: NAME`` are written to NAME first (the docs'
Accelerate config file). ```text blocks are output samples and templates, not run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import timm_dgate

from .markdown import fenced_blocks

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "recipes.md"


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
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, f"{script}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    runs = tmp_path / "runs"
    assert "drop-0.25pt" in timm_dgate.from_pretrained(runs / "fmnist" / "hub").profiles  # after `calibrate`
    _check_two_process_run(runs / "fmnist-2proc", outputs[2])
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
