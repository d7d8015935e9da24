"""Refusing to trace or export data-dependent exits, which would silently bake in one exit pattern."""

from __future__ import annotations

import torch

TRACING_MESSAGE = (
    "timm_dgate: {how} cannot capture a gated forward with open gates: which samples exit depends on the "
    "data, so a traced or exported graph would bake in one exit pattern. With every gate closed "
    "(gated.close_gates()) the gated model is the plain timm model and traces and exports as usual, "
    "or export gated.base_model; see docs/concepts.md, 'Threads, train mode, dtypes and export'."
)


def refuse_tracing() -> None:
    """Tracing or exporting the data-dependent exits would silently give a graph with one exit pattern."""
    if torch.jit.is_tracing():
        raise RuntimeError(TRACING_MESSAGE.format(how="torch.jit.trace / torch.onnx.export"))
    if torch.compiler.is_exporting():
        raise RuntimeError(TRACING_MESSAGE.format(how="torch.export / torch.onnx.export"))
