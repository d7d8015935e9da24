"""Gate fitting under the real Accelerate launcher with two CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .helpers import batches, run_launch, tiny_gated

WORKER = Path(__file__).parent / "workers" / "fit_worker.py"
KINDS = {"linear": 0, "mlp": 16}  # as the worker fits them
# Two processes sum their gradients in another order than one process does: float32
# round-off only. The gates' margins on held-out data agree to this fraction of their scale.
RELATIVE_TOLERANCE = 1e-3


def _env() -> dict[str, str]:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_two_processes_end_with_identical_gates_matching_one_process(tmp_path, fmnist):
    """Mini-batch steps over two shards take the one-process steps: linear and MLP gates alike."""
    launcher = Path(sys.executable).with_name("accelerate")
    launched = run_launch(
        [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",  # any free port
         str(WORKER), str(tmp_path)],
        env=_env(), timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    subprocess.run([sys.executable, str(WORKER), str(tmp_path)], check=True, env=_env(), timeout=300)
    images, _ = batches(fmnist.val)[0]
    for kind, hidden in KINDS.items():
        rank0 = load_file(tmp_path / f"{kind}_rank0_of2.safetensors")
        rank1 = load_file(tmp_path / f"{kind}_rank1_of2.safetensors")
        single = load_file(tmp_path / f"{kind}_rank0_of1.safetensors")
        for key in single:
            assert torch.equal(rank0[key], rank1[key]), f"{kind}: ranks differ on {key}"
        gated = tiny_gated(seed=0, gate_hidden=hidden)  # the worker's backbone
        margins = {}
        for name, state in (("two", rank0), ("one", single)):
            gated.gates.load_state_dict(state)
            with torch.no_grad():
                margins[name], _ = gated.forward_gates(images)
        for two, one in zip(margins["two"], margins["one"]):
            assert (two - one).abs().max() <= RELATIVE_TOLERANCE * one.abs().max(), kind
            assert (two.argmax(1) == one.argmax(1)).float().mean() >= 0.99, kind
        with safe_open(tmp_path / f"{kind}_rank0_of2.safetensors", "pt") as f:
            assert f.metadata()["num_samples"] == "600"  # every sample counted once across the ranks
