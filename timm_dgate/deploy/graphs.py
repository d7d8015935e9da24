"""CUDA graphs per segment, captured at a few batch sizes (buckets), for a gated model's shrinking batches.

On a GPU, a small batch is mostly kernel launches, and a gated model's batch shrinks at every
open gate. A CUDA graph replays a segment's launches at once, but only at the shapes it was
captured at, and the batch that reaches a segment takes any size. So each segment is captured
lazily at *buckets* (1, 2, 4, ... by default, or sizes the user gives): a batch is copied into
the rows of the next bucket up, the graph replays, and only the batch's own rows are copied out.
The padded rows hold whatever an earlier batch left there; every row is computed on its own in
eval mode, so they never reach an output, and a module in train mode (whose BatchNorm would
count them) runs eagerly instead.

A replay adds no host synchronisation: the copies in and out and the replay are queued on the
caller's stream. Graphs and their buffers are shared state, so a call holds the segment's lock
while it queues them and the next call's stream waits for the previous one's event.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .segments import segment_names

Capture = Callable[[Callable[[torch.Tensor], Any], torch.Tensor], "tuple[Callable[[], None], Any]"]
WARMUP_RUNS = 3


def default_buckets(batch_size: int) -> list[int]:
    """Powers of two below ``batch_size``, then ``batch_size`` itself."""
    return [*(2**i for i in range(max(batch_size - 1, 0).bit_length()) if 2**i < batch_size), batch_size]


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype | None]:
    kind = device.type
    return (True, torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else (False, None)


def cuda_capture(fn: Callable[[torch.Tensor], Any], static_input: torch.Tensor) -> tuple[Callable[[], None], Any]:
    """Capture ``fn(static_input)`` as a CUDA graph: warm-up runs on a side stream (lazy initialisation and
    autotuning stay out of the graph), then the capture. Returns the replay and the graph's outputs."""
    autocast, dtype = _autocast_state(static_input.device)

    def autocast_uncached() -> contextlib.AbstractContextManager:
        # autocast's cache of cast weights would be freed after capture while the graph still reads them;
        # warm-up and capture run with the same setting, so a compiled segment's guards hold for both
        if not autocast:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype, cache_enabled=False)

    stream = torch.cuda.Stream(static_input.device)
    stream.wait_stream(torch.cuda.current_stream(static_input.device))
    with torch.cuda.stream(stream), autocast_uncached():
        for _ in range(WARMUP_RUNS):
            fn(static_input)
    torch.cuda.current_stream(static_input.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast_uncached():
        output = fn(static_input)
    return graph.replay, output


def eager_capture(fn: Callable[[torch.Tensor], Any], static_input: torch.Tensor) -> tuple[Callable[[], None], Any]:
    """A stand-in for :func:`cuda_capture` that runs ``fn`` on the static buffers at each replay: the bucket
    bookkeeping without CUDA (how the CPU tests check that no padded row leaks)."""
    output = fn(static_input)

    def replay() -> None:
        _map2(lambda dst, src: dst.copy_(src), output, fn(static_input))

    return replay, output


def _map(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(fn, v) for v in value)
    raise TypeError(f"timm_dgate: a graphed segment must return tensors, got {type(value).__name__}")


def _map2(fn: Callable[[torch.Tensor, torch.Tensor], Any], a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        fn(a, b)
    else:
        for x, y in zip(a, b):
            _map2(fn, x, y)


def _cat(parts: Sequence[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0])(_cat(list(group)) for group in zip(*parts))


@dataclass
class _Graph:
    static_input: torch.Tensor
    replay: Callable[[], None]
    output: Any
    bytes: int


class BucketedGraphs:
    """``fn`` of one batch-first tensor, replayed from graphs captured lazily per bucket (and per trailing
    shape, dtype, memory layout and autocast state).

    ``buckets``: the batch sizes captured (a larger batch runs in pieces of the largest); ``None``: the
    next power of two of each batch seen. ``capture``: :func:`cuda_capture` (needs ``device`` to be CUDA)
    or :func:`eager_capture`.
    """

    def __init__(self, fn: Callable[[torch.Tensor], Any], buckets: Sequence[int] | None, device: torch.device,
                 capture: Capture = cuda_capture):
        if capture is cuda_capture and torch.device(device).type != "cuda":
            raise RuntimeError(
                f"timm_dgate: CUDA graphs need a model on a CUDA device, not {device}; on the CPU use compile()"
            )
        if buckets is not None and (not buckets or any(b < 1 for b in buckets)):
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        self.fn, self.capture = fn, capture
        self.buckets = sorted(set(buckets)) if buckets is not None else None
        self.graphs: dict[tuple, _Graph] = {}
        self._lock = threading.Lock()
        self._done: torch.cuda.Event | None = None

    def bucket_for(self, n: int) -> int:
        if self.buckets is None:
            return 1 << (n - 1).bit_length()
        return next(b for b in self.buckets if b >= n)

    @property
    def memory_bytes(self) -> int:
        """Device memory the captured graphs hold (buffers and graph pools, measured at capture)."""
        return sum(g.bytes for g in self.graphs.values())

    @property
    def captured(self) -> list[int]:
        """The batch sizes captured so far (with repeats for other shapes or dtypes)."""
        return sorted(key[0] for key in self.graphs)

    def __call__(self, x: torch.Tensor) -> Any:
        n = len(x)
        if n == 0:
            return self.fn(x)
        if self.buckets is not None and n > self.buckets[-1]:
            top = self.buckets[-1]
            return _cat([self(x[i : i + top]) for i in range(0, n, top)])
        bucket = self.bucket_for(n)
        layout = torch.channels_last if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        key = (bucket, tuple(x.shape[1:]), x.dtype, layout, _autocast_state(x.device))
        with self._lock:
            graph = self.graphs.get(key) or self._capture(key, x, layout)
            cuda = x.device.type == "cuda"
            if cuda and self._done is not None:
                torch.cuda.current_stream(x.device).wait_event(self._done)
            graph.static_input[:n].copy_(x)
            graph.replay()
            output = _map(lambda t: t[:n].clone(), graph.output)
            if cuda:
                self._done = torch.cuda.Event()
                self._done.record(torch.cuda.current_stream(x.device))
        return output

    def _capture(self, key: tuple, x: torch.Tensor, layout: torch.memory_format) -> _Graph:
        cuda = x.device.type == "cuda"
        before = torch.cuda.memory_reserved(x.device) if cuda else 0
        static = torch.zeros((key[0], *x.shape[1:]), dtype=x.dtype, device=x.device).contiguous(memory_format=layout)
        replay, output = self.capture(self.fn, static)
        used = torch.cuda.memory_reserved(x.device) - before if cuda else 0
        self.graphs[key] = _Graph(static, replay, output, used)
        return self.graphs[key]

    def __deepcopy__(self, memo: dict) -> BucketedGraphs:
        """A copy captures graphs of its own (graphs and their buffers belong to the original's memory)."""
        clone = object.__new__(BucketedGraphs)
        clone.fn, clone.capture, clone.buckets = copy.deepcopy(self.fn, memo), self.capture, self.buckets
        clone.graphs, clone._lock, clone._done = {}, threading.Lock(), None
        return clone


class _GraphedForward:
    """A segment module's forward: one tensor in eval mode without gradients replays its graphs, any other
    call (train mode, gradients, several inputs) runs the module's own forward."""

    def __init__(self, module: nn.Module, graphs: BucketedGraphs):
        self.module, self.graphs, self.eager = module, graphs, graphs.fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if (kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or self.module.training
                or torch.is_grad_enabled()):
            return self.eager(*args, **kwargs)
        return self.graphs(args[0])


@dataclass
class SegmentGraphs:
    """The graphed segments of a gated model: module name -> its :class:`BucketedGraphs`."""

    segments: dict[str, BucketedGraphs]

    @property
    def memory_bytes(self) -> int:
        return sum(g.memory_bytes for g in self.segments.values())

    @property
    def num_graphs(self) -> int:
        return sum(len(g.graphs) for g in self.segments.values())


def graph_segments(model: nn.Module, boundaries: Sequence[str], buckets: Sequence[int] | None = None,
                   capture: Capture = cuda_capture) -> SegmentGraphs:
    """Replace the forward of every segment of ``model`` (as ``compile()`` cuts it) with graphs captured lazily
    per bucket; the modules that hold a boundary, and so the exit hooks, stay eager."""
    device = next(model.parameters()).device
    graphed = {}
    for name in segment_names(model, boundaries):
        module = model.get_submodule(name)
        if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
            continue  # an activation or pooling alone: a launch or two, not worth a graph's memory
        graphs = BucketedGraphs(module.forward, buckets, device, capture)
        module.forward = _GraphedForward(module, graphs)
        graphed[name] = graphs
    return SegmentGraphs(graphed)



def graphed_modules(model: nn.Module) -> list[str]:
    """The modules of ``model`` whose forward :func:`graph_segments` replaced."""
    return [name for name, m in model.named_modules() if isinstance(m.__dict__.get("forward"), _GraphedForward)]
