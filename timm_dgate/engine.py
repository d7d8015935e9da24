"""The early-exit executor: forward hooks that take exited samples out of the batch.

A hook on each gated module sees the stage's output, lets a ``decide`` function pick the
samples that leave, records them, and hands the rest of timm's own forward a smaller
batch. When no sample is left it raises :class:`AllExited`, so the later stages never
run. There is no Python loop over samples and one host synchronisation per open gate (to
learn how many samples stay). :class:`ExitRun` is the bookkeeping of one such forward, shared
with ``timm_dgate.runtime``, which drives exported segments instead of hooks.

The state of a running forward belongs to that call: it sits in a context variable (one per
thread, and per asyncio task), and a hook acts only for the engine whose forward is running
in the current context. So a plain call of the same timm model in another thread, a second
engine on the same model, or any number of threads calling one gated model each see exactly
what they would see alone.
"""

from __future__ import annotations

import math
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


class AllExited(Exception):
    """Raised at a boundary when every sample has exited: the later stages must not run."""


@dataclass(frozen=True)
class ExitResult:
    """Logits in input order, and per sample the gate it exited at (``num_gates`` = the head)."""

    logits: torch.Tensor
    exits: torch.Tensor


def threshold_decide(
    gates: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    thresholds: Sequence[float],
    score: Callable[[torch.Tensor], torch.Tensor],
) -> Decide:
    """The exit rule: at gate k a sample leaves when ``score(margins) >= thresholds[k]``; ``inf`` skips the gate."""

    def decide(k: int, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if thresholds[k] == math.inf:
            return None
        margins = gates[k](output)
        return margins, score(margins) >= thresholds[k]

    return decide


class ExitRun:
    """State of one early-exit forward: which of the original samples are still in the batch.

    The engine's hooks call :meth:`boundary`, which asks ``decide``; ``timm_dgate.runtime``, whose
    exported segments give the gate's margins themselves, calls :meth:`leave` directly.
    """

    def __init__(self, batch: int, device: torch.device, decide: Decide | None = None):
        self.batch = batch
        self.alive = torch.arange(batch, device=device)
        self.exited: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.decide = decide

    def boundary(self, k: int, output: torch.Tensor) -> torch.Tensor | None:
        """What goes on from gate ``k``: ``None`` (everyone), the staying rows, or :class:`AllExited`."""
        decision = self.decide(k, output)
        return None if decision is None else self.leave(k, output, *decision)

    def leave(self, k: int, output: torch.Tensor, margins: torch.Tensor, leave: torch.Tensor) -> torch.Tensor | None:
        """Samples with ``leave`` exit at gate ``k`` with ``margins`` as logits; the staying rows of ``output``."""
        n_stay = leave.numel() - int(leave.sum())  # the one host sync at this gate
        if n_stay == leave.numel():
            return None
        if n_stay == 0:  # everyone leaves (always so at batch 1): nothing to reorder
            self.exited.append((self.alive, margins, k))
            raise AllExited
        order = torch.argsort(leave.to(torch.uint8), stable=True)  # staying samples first
        stay, go = order[:n_stay], order[n_stay:]
        self.exited.append((self.alive[go], margins[go], k))
        self.alive = self.alive[stay]
        return output[stay]  # unlike index_select, keeps the layout: channels_last stays channels_last

    def finish(self, head: torch.Tensor | None, head_index: int) -> ExitResult:
        """Logits in input order from every exit and the head's rows (``None``: nobody reached it)."""
        pieces = list(self.exited)
        if head is not None:
            if not isinstance(head, torch.Tensor):
                raise TypeError(f"timm_dgate: the model returned {type(head).__name__}, not logits")
            pieces.append((self.alive, head, head_index))
        device = self.alive.device
        if len(pieces) == 1:  # all left at one place and nobody before it: rows already in input order
            _, values, k = pieces[0]
            return ExitResult(values, torch.full((self.batch,), k, dtype=torch.long, device=device))
        dtype = pieces[-1][1].dtype
        for _, values, _ in pieces:
            dtype = torch.promote_types(dtype, values.dtype)
        logits = torch.empty((self.batch, pieces[-1][1].shape[1]), dtype=dtype, device=device)
        exits = torch.empty(self.batch, dtype=torch.long, device=device)
        for index, values, k in pieces:
            logits[index] = values.to(dtype)
            exits[index] = k
        return ExitResult(logits, exits)


class _CollectRun:
    """State of one full forward: every gated module's output is passed to ``fn`` and kept."""

    def __init__(self, fn: Collect, num_modules: int):
        self.fn = fn
        self.outputs: list[list[object]] = [[] for _ in range(num_modules)]

    def boundary(self, k: int, output: torch.Tensor) -> None:
        self.outputs[k].append(self.fn(k, output))


# engine id -> the run of that engine's forward in progress in this context (thread / task)
_RUNS: ContextVar[Mapping[int, ExitRun | _CollectRun]] = ContextVar(
    "timm_dgate_runs", default=MappingProxyType({})
)


class ExitEngine:
    """Hooks ``modules`` of ``model`` so a forward can drop samples at each of them."""

    def __init__(self, model: nn.Module, modules: Sequence[str]):
        self.model = model
        self.modules = list(modules)
        # hook ids, not handles: a deep copy of the model keeps the ids, so its copy of the engine removes its own
        self._hook_ids = [
            model.get_submodule(name).register_forward_hook(partial(self._hook, k)).id
            for k, name in enumerate(self.modules)
        ]

    @property
    def attached(self) -> bool:
        return bool(self._hook_ids)

    def _hook(self, k: int, module: nn.Module, args: object, output: object) -> torch.Tensor | None:
        run = _RUNS.get().get(id(self))
        if run is None:  # a plain call of the timm model, or another engine's forward: stay out of the way
            return None
        return run.boundary(k, output)

    def _forward(self, run: ExitRun | _CollectRun, x: torch.Tensor) -> torch.Tensor | None:
        runs = _RUNS.get()
        if id(self) in runs:
            raise RuntimeError("timm_dgate: the backbone called its own gated model from inside its forward")
        token = _RUNS.set({**runs, id(self): run})
        try:
            return self.model(x)
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
        for name, hook_id in zip(self.modules, self._hook_ids):
            self.model.get_submodule(name)._forward_hooks.pop(hook_id, None)
        self._hook_ids = []
