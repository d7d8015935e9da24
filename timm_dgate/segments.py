"""Compiled segments: the work between exits compiled once, the exit decisions left eager.

``torch.compile`` of a whole gated model breaks its graph at every open gate and recompiles for
every new batch size and exit pattern. Here the backbone is cut into segments instead: the
largest submodules that contain no gated boundary (for a ResNet: the stem's layers, each block
of every stage, the head). Each is compiled on its own with a dynamic batch dimension, while the
modules that hold a boundary, and so the hooks that remove exited samples, stay eager. The
number of compiled graphs then depends on the architecture, not on the batch sizes or exits.

Each segment gets its own compiled function (its own code object), so dynamo keeps one cache
per segment and no segment evicts another's graphs.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def segment_names(model: nn.Module, boundaries: Sequence[str]) -> list[str]:
    """The largest submodules of ``model`` that neither are nor contain a boundary module, in order."""
    found: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if any(b == full or b.startswith(f"{full}.") for b in boundaries):
                walk(full, child)
            else:
                found.append(full)

    walk("", model)
    return found


def _run_segment(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return forward(*args, **kwargs)


def compile_segments(model: nn.Module, boundaries: Sequence[str], **compile_kwargs: Any) -> list[str]:
    """Compile every segment of ``model`` in place (``torch.compile`` kwargs; ``dynamic=True`` by default)."""
    compile_kwargs = {"dynamic": True, **compile_kwargs}
    names = segment_names(model, boundaries)
    for index, name in enumerate(names):
        module = model.get_submodule(name)
        code = _run_segment.__code__.replace(co_name=f"timm_dgate_segment_{index}")  # a cache of its own
        runner = types.FunctionType(code, _run_segment.__globals__, code.co_name)
        module.forward = functools.partial(torch.compile(runner, **compile_kwargs), module.forward)
    return names
