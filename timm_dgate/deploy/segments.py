"""The segment cut: the work between exits, compiled once (``compile``) or exported (``exit_chain``).

``torch.compile`` of a whole gated model breaks its graph at every open gate and recompiles for
every new batch size and exit pattern. Here the backbone is cut into segments instead: the
largest submodules that contain no gated boundary (for a ResNet: the stem's layers, each block
of every stage, the head). Each is compiled on its own with a dynamic batch dimension, while the
modules that hold a boundary, and so the hooks that remove exited samples, stay eager. The
number of compiled graphs then depends on the architecture, not on the batch sizes or exits.

Each segment gets its own compiled function (its own code object), so dynamo keeps one cache
per segment and no segment evicts another's graphs.

Export needs more than the cut: running the segments one after another must *be* the model's
forward, with each boundary's output the output of its last segment. :func:`exit_chain` checks
that on an example batch (every tensor a segment takes is exactly the one the previous segment
gave) and groups the segments into the work before each exit and after the last.
"""

from __future__ import annotations

import copy
import functools
import types
from collections import Counter
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..core.contract import GatedBackbone
from ..core.scores import exit_score
from ..errors import ExportError


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


def _dynamo_counts() -> dict[str, Counter]:
    from torch._dynamo.utils import counters

    return {key: Counter(value) for key, value in counters.items()}


@torch.no_grad()
def compile_problem(gated: GatedBackbone, batch_sizes: Sequence[int] = (5, 9)) -> str | None:
    """Why ``gated.compile()`` does not work for this model, or ``None`` when it does.

    Compiles a copy with dynamo's ``eager`` backend (the graphs inductor would compile, without
    generating code) and warms it at batch sizes 1 and 2 (dynamo specialises size 1). Then, with
    each gate's threshold at the median of its scores so samples leave at every gate, it runs
    ``batch_sizes``: these must reuse the warm graphs. Reports a failure, a graph break or a
    fallback to eager inside a segment, a recompile, or outputs that differ from eager (1e-4).
    """
    model = copy.deepcopy(gated).eval()
    param = next(model.parameters())
    batches = [torch.randn((n, *model.input_size), generator=torch.Generator().manual_seed(n)).to(param)
               for n in (1, 2, *batch_sizes)]
    margins, _ = model.forward_gates(torch.cat(batches[2:]))
    thresholds = [exit_score(m, model.exit_score).median().item() for m in margins]
    model.set_thresholds(thresholds)
    want = [model(x, return_exits=True) for x in batches[2:]]
    before = _dynamo_counts()
    try:
        model.compile(backend="eager")
        model.close_gates()
        for x in batches[:2]:
            model(x)
        warm = _dynamo_counts()["stats"]["unique_graphs"]
        model.set_thresholds(thresholds)
        got = [model(x, return_exits=True) for x in batches[2:]]
    except Exception as error:
        return f"compiling a segment fails ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    after = _dynamo_counts()
    breaks = after.get("graph_break", Counter()) - before.get("graph_break", Counter())
    if breaks:
        return f"a segment's graph breaks: {next(iter(breaks))}"[:300]
    fallbacks = after.get("unimplemented", Counter()) - before.get("unimplemented", Counter())
    if fallbacks:
        return f"a segment runs eager (dynamo gave up: {next(iter(fallbacks))})"[:300]
    if after["stats"]["unique_graphs"] > warm:
        return f"new batch sizes and exit patterns compile new graphs ({after['stats']['unique_graphs'] - warm})"
    for w, g in zip(want, got):
        if not torch.equal(w.exits, g.exits) or not torch.allclose(w.logits, g.logits, rtol=0, atol=1e-4):
            return "the compiled model's exits or logits differ from eager"
    return None


class Chain(nn.Module):
    """Modules run one after another: the work between two exits as one exportable module."""

    def __init__(self, steps: Sequence[nn.Module]):
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x


_RECORDING: ContextVar[object | None] = ContextVar("timm_dgate_exit_chain", default=None)


def _same(a: object, b: object) -> bool:
    return a is b or (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    )


@torch.no_grad()
def exit_chain(model: nn.Module, boundaries: Sequence[str], example: torch.Tensor) -> list[list[str]]:
    """The segments (and leaf boundary modules) before each boundary and after the last, in call order.

    Raises :class:`~timm_dgate.errors.ExportError` where the model's forward on ``example`` is not
    exactly that chain: work outside any module between two segments (a position embedding
    added in ``forward``, a residual around a boundary), a module called twice or with more than
    one input, a boundary whose output is not its last segment's.
    """
    units = segment_names(model, boundaries)
    units += [b for b in boundaries if not any(u.startswith(f"{b}.") for u in units)]  # leaf boundaries
    calls: list[tuple[str, tuple, dict, object]] = []
    ends: dict[str, object] = {}
    mine = object()  # the hooks record this call only, not another thread's forward of the same modules

    def record(name: str, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if _RECORDING.get() is mine:
            calls.append((name, args, kwargs, output))

    def record_end(name: str, module: nn.Module, args: tuple, output: object) -> None:
        if _RECORDING.get() is mine:
            ends[name] = output

    hook = model.get_submodule
    handles = [hook(u).register_forward_hook(functools.partial(record, u), with_kwargs=True) for u in units]
    handles += [hook(b).register_forward_hook(functools.partial(record_end, b)) for b in boundaries]
    token = _RECORDING.set(mine)
    try:
        output = model(example)
    finally:
        _RECORDING.reset(token)
        for handle in handles:
            handle.remove()
    order = [name for name, *_ in calls]
    repeated = sorted({n for n in order if order.count(n) > 1})
    if repeated:
        raise ExportError(f"cannot export: `{repeated[0]}` runs {order.count(repeated[0])} times per forward")
    previous: object = example
    for i, (name, args, kwargs, out) in enumerate(calls):
        if kwargs or len(args) != 1 or not _same(args[0], previous):
            after = f"`{calls[i - 1][0]}`'s output" if i else "the input"
            raise ExportError(
                f"cannot export: the forward is not a chain of its segments: `{name}` does not take exactly {after} "
                "(something outside a module runs between them, such as a position embedding, a residual "
                "or a reshape in the model's forward)"
            )
        previous = out
    if not _same(output, previous):
        raise ExportError(f"cannot export: the logits are not `{order[-1]}`'s output (the forward ends outside one)")
    pieces, start = [], 0
    for boundary in boundaries:
        inside = [i for i, n in enumerate(order) if n == boundary or n.startswith(f"{boundary}.")]
        if not inside or inside[-1] < start or not _same(ends.get(boundary), calls[inside[-1]][3]):
            raise ExportError(f"cannot export: the output of boundary `{boundary}` is not the end of a segment")
        pieces.append(order[start : inside[-1] + 1])
        start = inside[-1] + 1
    return [*pieces, order[start:]]
