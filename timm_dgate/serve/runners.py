"""The work inside a replica, without Ray: one stage on a batch of rows from many requests (the per-segment
shape), or the whole model on requests as they arrive (the refill executor; one call per profile for a
cascade; the plain backbone).

Every row is decided by its own request's policy (``ExitPolicy.leaves``, the rule the model itself
applies), so requests of different profiles share a batch. Tensors handed back are copies of their row:
a view would carry its whole batch's storage across processes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

import torch

from ..core.contract import RunnableExitModel
from ..core.policy import ExitPolicy
from ..deploy.refill import RefillExecutor
from ..deploy.stages import stages_of
from .spec import plain_forward

Answer = tuple[torch.Tensor, int]  # one request's logits (those it left with) and the exit it took
Row = tuple[torch.Tensor, ExitPolicy]  # one request's input to a stage and its policy


def leaving(k: int, margins: torch.Tensor, policies: Sequence[ExitPolicy]) -> torch.Tensor | None:
    """Who leaves at gate ``k``, each row by its own policy; ``None`` when no row's policy opens the gate."""
    opened = {p for p in policies if p.thresholds[k] != float("inf")}
    if not opened:
        return None
    if len(set(policies)) == 1:
        return policies[0].leaves(k, margins)
    leave = torch.zeros(len(policies), dtype=torch.bool, device=margins.device)
    for policy in opened:
        rows = torch.tensor([p == policy for p in policies], device=margins.device)
        leave |= rows & policy.leaves(k, margins)
    return leave


class SegmentRunner:
    """Stage ``k`` of ``model`` (the work before exit ``k`` and its gate; ``k == num_gates``: the head) on a
    batch of rows: each row leaves with its logits or goes on with its features."""

    def __init__(self, model: RunnableExitModel, k: int):
        stages = stages_of(model)
        if not 0 <= k <= stages.num_gates:
            raise ValueError(f"stage {k} does not exist: this model has {stages.num_gates} gates and a head")
        self.k, self.head = k, k == stages.num_gates
        self.stage = stages.head if self.head else stages.steps[k]
        self.device, self.dtype = stages.device, stages.dtype

    @torch.inference_mode()
    def run(self, rows: Sequence[Row]) -> list[tuple[bool, torch.Tensor]]:
        """Per row, in order: ``(True, logits)`` where it leaves here, ``(False, features)`` where it goes on."""
        x = torch.stack([features for features, _ in rows]).to(self.device, self.dtype)
        if self.head:
            logits = self.stage(x).cpu()
            return [(True, row.clone()) for row in logits]
        features, margins = self.stage(x)
        leave = leaving(self.k, margins, [policy for _, policy in rows])
        features = features.cpu()
        if leave is None:
            return [(False, row.clone()) for row in features]
        margins = margins.cpu()
        return [(True, margins[i].clone()) if left else (False, features[i].clone())
                for i, left in enumerate(leave.tolist())]


class Runner(Protocol):
    """The whole model inside one replica: requests go in as tickets; each step answers those that finished."""

    pending: int  # rows submitted and not yet answered

    def step(self, requests: Sequence[Row], flush: bool) -> tuple[list[int], dict[int, Answer], list[tuple[str, int]]]:
        """Submit ``requests`` (their tickets, in order), run, and return the tickets answered now and each stage
        run's (stage, rows). ``flush``: run every waiting row to its exit, partial batches included."""
        ...


class RefillRunner:
    """The refill executor inside a replica: each request a ticket of one row under its own policy; each stage
    runs when ``batch_size`` rows wait for it (or on a flush), whichever requests they came from."""

    def __init__(self, model: RunnableExitModel, batch_size: int):
        self.executor = RefillExecutor(model, batch_size)
        self.batch_size = batch_size
        self.open: set[int] = set()
        self.num_gates = model.num_gates

    @property
    def pending(self) -> int:
        return self.executor.waiting

    def step(self, requests: Sequence[Row], flush: bool) -> tuple[list[int], dict[int, Answer], list[tuple[str, int]]]:
        runs, rows = list(self.executor.stats.runs), list(self.executor.stats.rows)
        tickets = [self.executor.submit(x[None], policy) for x, policy in requests]
        self.open.update(tickets)
        self.executor.flush() if flush else self.executor.run_full()
        finished = {}
        for ticket in [t for t in self.open if self.executor.done(t)]:
            result = self.executor.pop(ticket)
            finished[ticket] = (result.logits[0].cpu().clone(), int(result.exits[0]))
            self.open.discard(ticket)
        return tickets, finished, self._batches(runs, rows)

    def _batches(self, runs: list[int], rows: list[int]) -> list[tuple[str, int]]:
        """Each stage run's size since the counts ``runs``, ``rows``: a step's runs are full batches but the last
        of a flush, so the counts tell every size."""
        sizes = []
        for k, (n, r) in enumerate(zip(self.executor.stats.runs, self.executor.stats.rows)):
            n, r = n - runs[k], r - rows[k]
            if n:
                sizes += [(str(k), self.batch_size)] * (n - 1) + [(str(k), r - (n - 1) * self.batch_size)]
        return sizes


class GroupedRunner:
    """The model on every request at once, one call per policy (a cascade, which has no stages of one backbone),
    or the plain backbone on all of them (``plain``: the model without its exits)."""

    def __init__(self, model: RunnableExitModel, plain: bool = False):
        self.model, self.plain = model, plain
        self.forward = plain_forward(model) if plain else None
        self.tickets = itertools.count()
        self.pending = 0

    @torch.inference_mode()
    def step(self, requests: Sequence[Row], flush: bool) -> tuple[list[int], dict[int, Answer], list[tuple[str, int]]]:
        tickets = [next(self.tickets) for _ in requests]
        if not requests:
            return tickets, {}, []
        x = torch.stack([x for x, _ in requests])
        if self.forward is not None:
            logits = self.forward(x).cpu()
            k = self.model.num_gates
            return tickets, {t: (row.clone(), k) for t, row in zip(tickets, logits)}, [("model", len(x))]
        finished, batches = {}, []
        groups: dict[ExitPolicy, list[int]] = {}
        for i, (_, policy) in enumerate(requests):
            groups.setdefault(policy, []).append(i)
        for policy, rows in groups.items():
            result = self.model(x[rows], return_exits=True, profile=policy)
            logits, exits = result.logits.cpu(), result.exits.tolist()
            finished.update({tickets[i]: (logits[j].clone(), exits[j]) for j, i in enumerate(rows)})
            batches.append(("model", len(rows)))
        return tickets, finished, batches
