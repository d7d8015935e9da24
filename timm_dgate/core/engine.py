"""The early-exit executor: forward hooks that take exited samples out of the batch.

A hook on each gated module sees the stage's output, lets a ``decide`` function pick the
samples that leave, records them, and hands the rest of timm's own forward a smaller
batch. A stage may hand on a tuple or list (tokens and class tokens, one tensor per branch):
the gate reads one element of it (``part``) and every tensor in it that carries the batch is
cut alike, batch-major groups (``B * N`` rows) included. With ``realign``, a later module
called with a tensor still at an earlier, larger batch size (a shortcut around the boundary,
a cell's input from two cells back) gets the surviving rows of it too. When no sample is
left the hook raises :class:`AllExited`, so the later stages never run. There is no Python
loop over samples and one host synchronisation per open gate (to learn how many samples stay).
:class:`ExitRun` is the bookkeeping of one such forward, shared with ``timm_dgate.deploy.runtime``,
which drives exported segments instead of hooks.

The state of a running forward belongs to that call: it sits in a context variable (one per
thread, and per asyncio task), and a hook acts only for the engine whose forward is running
in the current context. So a plain call of the same timm model in another thread, a second
engine on the same model, or any number of threads calling one gated model each see exactly
what they would see alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType

import torch
from torch import nn

# decide(gate_index, stage_output) -> (margins (B, C), leave mask (B,)) or None (nobody leaves)
Decide = Callable[[int, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]
Collect = Callable[[int, torch.Tensor], object]
# forward(model, x) -> logits: the model's own forward, for families that need it rewritten (see ExitEngine)
Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class AllExited(Exception):
    """Raised at a boundary when every sample has exited: the later stages must not run."""


@dataclass(frozen=True)
class ExitResult:
    """Logits in input order, and per sample the gate it exited at (``num_gates`` = the head)."""

    logits: torch.Tensor
    exits: torch.Tensor


def select_part(output: object, part: int | None) -> object:
    """The element of a stage's output a gate reads (the output itself when ``part`` is None)."""
    return output if part is None else output[part]  # type: ignore[index]


def take_rows(value: object, keep: torch.Tensor, batch: int) -> object:
    """``value`` with only the rows ``keep`` of a ``batch``: tensors of that batch (or of batch-major
    groups of it), inside tuples and lists too; anything else passes unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim:
        if value.shape[0] == batch:
            return value[keep]  # unlike index_select, keeps the layout: channels_last stays channels_last
        if value.shape[0] % batch == 0:  # B * N rows, batch-major (e.g. tnt's pixel tokens)
            return value.unflatten(0, (batch, -1))[keep].flatten(0, 1)
        return value
    if isinstance(value, (tuple, list)):
        rows = [take_rows(v, keep, batch) for v in value]
        return type(value)(*rows) if hasattr(value, "_fields") else type(value)(rows)  # namedtuples too
    return value


class ExitRun:
    """State of one early-exit forward: which of the original samples are still in the batch.

    The engine's hooks call :meth:`boundary`, which asks ``decide``; ``timm_dgate.deploy.runtime``, whose
    exported segments give the gate's margins themselves, calls :meth:`leave` directly.
    """

    def __init__(self, batch: int, device: torch.device, decide: Decide | None = None):
        self.batch = batch
        self.alive = torch.arange(batch, device=device)
        self.exited: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.decide = decide
        self.earlier: dict[int, torch.Tensor] = {}  # batch size -> the samples alive at that size

    def boundary(self, k: int, output: object, part: int | None = None) -> object:
        """What goes on from gate ``k``: ``None`` (everyone), the staying rows, or :class:`AllExited`."""
        decision = self.decide(k, select_part(output, part))  # type: ignore[arg-type]
        return None if decision is None else self.leave(k, output, *decision)

    def leave(self, k: int, output: object, margins: torch.Tensor, leave: torch.Tensor) -> object:
        """Samples with ``leave`` exit at gate ``k`` with ``margins`` as logits; the staying rows of ``output``."""
        n_stay = leave.numel() - int(leave.sum())  # the one host sync at this gate
        if n_stay == leave.numel():
            return None
        if n_stay == 0:  # everyone leaves (always so at batch 1): nothing to reorder
            self.exited.append((self.alive, margins, k))
            raise AllExited
        order = torch.argsort(leave.to(torch.uint8), stable=True)  # staying samples first, in input order
        stay, go = order[:n_stay], order[n_stay:]
        self.exited.append((self.alive[go], margins[go], k))
        self.earlier[leave.numel()] = self.alive
        self.alive = self.alive[stay]
        return take_rows(output, stay, leave.numel())

    def realign(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Arguments of a later module with tensors still at an earlier batch size cut to the survivors."""
        stale = {len(v) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim}
        stale &= self.earlier.keys()
        if not stale:
            return None
        for size in stale:
            keep = torch.searchsorted(self.earlier[size], self.alive)  # alive stays sorted: rows keep input order
            args = tuple(take_rows(a, keep, size) if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {n: take_rows(v, keep, size) if isinstance(v, torch.Tensor) else v for n, v in kwargs.items()}
        return args, kwargs

    def finish(self, head: torch.Tensor | None, head_index: int) -> ExitResult:
        """Logits in input order from every exit and the head's rows (``None``: nobody reached it)."""
        pieces = list(self.exited)
        if head is not None:
            if not isinstance(head, torch.Tensor):
                raise TypeError(f"timm_dgate: the model returned {type(head).__name__}, not logits")
            pieces.append((self.alive, head, head_index))
        return assemble(self.batch, pieces, self.alive.device)


def assemble(
    batch: int, pieces: Sequence[tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]], device: torch.device
) -> ExitResult:
    """One batch's result from its exit groups ``(rows, logits of those rows, exit)``, rows in input order;
    the exit is one index for the group or one per row (a cascade's). Shared by :class:`ExitRun`, the
    refill executor, whose groups come from several stage runs, and the cascade."""
    if len(pieces) == 1:  # all left at one place and nobody before it: rows already in input order
        _, values, k = pieces[0]
        exits = k if isinstance(k, torch.Tensor) else torch.full((batch,), k, dtype=torch.long, device=device)
        return ExitResult(values, exits)
    dtype = pieces[-1][1].dtype
    for _, values, _ in pieces:
        dtype = torch.promote_types(dtype, values.dtype)
    logits = torch.empty((batch, pieces[-1][1].shape[1]), dtype=dtype, device=device)
    exits = torch.empty(batch, dtype=torch.long, device=device)
    for index, values, k in pieces:
        logits[index] = values.to(dtype)
        if isinstance(k, torch.Tensor):
            exits[index] = k
        else:
            exits.index_fill_(0, index, k)  # not exits[index] = k: on CUDA that copies k to the device and syncs
    return ExitResult(logits, exits)


class _CollectRun:
    """State of one full forward: every gated module's output is passed to ``fn`` and kept."""

    def __init__(self, fn: Collect, num_modules: int):
        self.fn = fn
        self.outputs: list[list[object]] = [[] for _ in range(num_modules)]

    def boundary(self, k: int, output: object, part: int | None) -> None:
        self.outputs[k].append(self.fn(k, select_part(output, part)))  # type: ignore[arg-type]

    def realign(self, args: tuple, kwargs: dict) -> None:
        return None


# engine id -> the run of that engine's forward in progress in this context (thread / task)
_RUNS: ContextVar[Mapping[int, ExitRun | _CollectRun]] = ContextVar(
    "timm_dgate_runs", default=MappingProxyType({})
)


class ExitEngine:
    """Hooks ``modules`` of ``model`` so a forward can drop samples at each of them.

    ``parts``: per module, which element of a tuple or list output the gate reads (None: the
    output is one tensor). ``realign``: also hook every module's input, for backbones that
    hand a tensor around a boundary (see the module doc); off, no other module is touched.
    ``forward``: what a run calls instead of ``model(x)``, for a family whose own forward keeps a
    batch size from before a boundary (``timm_dgate.boundaries.adapters``); a plain call of the
    model is never routed through it.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[str],
        parts: Sequence[int | None] | None = None,
        realign: bool = False,
        forward: Forward | None = None,
    ):
        self.model = model
        self.forward = forward
        self.modules = list(modules)
        self.parts = list(parts) if parts is not None else [None] * len(self.modules)
        # hook ids, not handles: a deep copy of the model keeps the ids, so its copy of the engine removes its own
        self._hook_ids = [
            (name, model.get_submodule(name).register_forward_hook(partial(self._hook, k)).id)
            for k, name in enumerate(self.modules)
        ]
        if realign:
            self._pre_hook_ids = [
                (name, module.register_forward_pre_hook(self._pre_hook, with_kwargs=True).id)
                for name, module in model.named_modules()
            ]
        else:
            self._pre_hook_ids = []
        self._attached = True  # not bool(hooks): an engine with no gates (a cascade member's head only) is attached

    @property
    def attached(self) -> bool:
        return self._attached

    def _hook(self, k: int, module: nn.Module, args: object, output: object) -> object:
        run = _RUNS.get().get(id(self))
        if run is None:  # a plain call of the timm model, or another engine's forward: stay out of the way
            return None
        return run.boundary(k, output, self.parts[k])

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        run = _RUNS.get().get(id(self))
        return None if run is None else run.realign(args, kwargs)

    def _forward(self, run: ExitRun | _CollectRun, x: torch.Tensor) -> torch.Tensor | None:
        runs = _RUNS.get()
        if id(self) in runs:
            raise RuntimeError("timm_dgate: the backbone called its own gated model from inside its forward")
        token = _RUNS.set({**runs, id(self): run})
        try:
            return self.model(x) if self.forward is None else self.forward(self.model, x)
        except AllExited:
            return None
        finally:
            _RUNS.reset(token)

    def exit_forward(self, x: torch.Tensor, decide: Decide) -> ExitResult:
        """Forward with early exits; rows come from the gate each sample left at, or the head."""
        run = ExitRun(x.shape[0], x.device, decide)
        return run.finish(self._forward(run, x), len(self.modules))

    def collect(self, x: torch.Tensor, fn: Collect) -> tuple[list[list[object]], torch.Tensor]:
        """One full forward: ``fn(k, output)`` at every module (in call order) and the logits."""
        run = _CollectRun(fn, len(self.modules))
        logits = self._forward(run, x)
        return run.outputs, logits

    def remove(self) -> None:
        """Take the hooks off the model; it is a plain timm model again."""
        for name, hook_id in self._hook_ids:
            self.model.get_submodule(name)._forward_hooks.pop(hook_id, None)
        for name, hook_id in self._pre_hook_ids:
            module = self.model.get_submodule(name)
            module._forward_pre_hooks.pop(hook_id, None)
            module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        self._hook_ids, self._pre_hook_ids = [], []
        self._attached = False
