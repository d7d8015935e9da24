"""One deployment running the whole model: requests pooled in each replica, stages refilled across them.

Each request is a ticket of the replica's refill executor (``timm_dgate.deploy.refill``) under its own
policy. The replica collects what arrives, up to ``max_batch_size`` requests or ``batch_wait_timeout_s``
after the first, submits it and runs every stage that holds a full batch; survivors wait at their next
stage for more. When a collection ends short of a full batch (traffic is light), or the oldest waiting
request has waited ``FLUSH_AFTER`` batch waits, everything waiting runs to its exit. A cascade (no stages
of one backbone) runs one call per profile on each collection, and the plain model (``shape="plain"``)
one call of the backbone. Imports Ray: loaded by ``serve.app`` only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve

from ..core.policy import ExitPolicy
from .metrics import ReplicaMetrics
from .runners import Answer, GroupedRunner, RefillRunner, Runner
from .spec import load_model, threads

FLUSH_AFTER = 4  # batch waits the oldest waiting request may wait before everything runs out


@dataclass
class _Request:
    x: torch.Tensor
    policy: ExitPolicy
    future: asyncio.Future
    arrived: float


@serve.deployment
class WholeModel:
    """The model in ``folder`` in one replica; ``shape``: ``whole`` (with exits) or ``plain`` (the backbone alone)."""

    def __init__(self, folder: str, kind: str, shape: str, max_batch_size: int, batch_wait_timeout_s: float,
                 torch_threads: int | None = None):
        threads(torch_threads)
        self.model = load_model(folder, kind)
        self.shape, self.max_batch_size, self.batch_wait = shape, max_batch_size, batch_wait_timeout_s
        self.runner = self._runner()
        self.metrics = ReplicaMetrics()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dgate-whole")
        self.inbox: asyncio.Queue[_Request] | None = None
        self.task: asyncio.Task | None = None
        self.waiting: dict[int, _Request] = {}

    def _runner(self) -> Runner:
        if self.shape == "plain":
            return GroupedRunner(self.model, plain=True)
        if hasattr(self.model, "members"):  # a cascade: no stages of one backbone
            return GroupedRunner(self.model)
        return RefillRunner(self.model, self.max_batch_size)

    async def __call__(self, x: torch.Tensor, policy: ExitPolicy) -> Answer:
        """One request's image: its logits and exit, once the model has run it."""
        loop = asyncio.get_running_loop()
        if self.inbox is None:
            self.inbox = asyncio.Queue()
        if self.task is None or self.task.done():  # the first call, or the loop ended on a bug: start afresh
            self._fail(RuntimeError("the replica's serving loop stopped; send the request again"))
            self.task = loop.create_task(self._serve())
        future = loop.create_future()
        self.inbox.put_nowait(_Request(x, policy, future, time.monotonic()))
        return await future

    async def _collect(self) -> list[_Request]:
        """Up to ``max_batch_size`` new requests, for at most one batch wait after the first; nothing new within
        a batch wait while rows are waiting ends it empty (those rows are flushed then)."""
        assert self.inbox is not None
        items: list[_Request] = []
        deadline = None
        while len(items) < self.max_batch_size:
            if deadline is None:
                timeout = self.batch_wait if self.runner.pending else None
            else:
                timeout = max(0.0, deadline - time.monotonic())
            try:
                item = self.inbox.get_nowait() if self.inbox.qsize() or timeout == 0 else await asyncio.wait_for(
                    self.inbox.get(), timeout)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            items.append(item)
            deadline = deadline or time.monotonic() + self.batch_wait
        return items

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            now = time.monotonic()
            oldest = min((r.arrived for r in self.waiting.values()), default=now)
            flush = len(items) < self.max_batch_size or now - oldest > FLUSH_AFTER * self.batch_wait
            for item in items:
                self.metrics.waited("whole", now - item.arrived)
            if items:
                self.metrics.batch("collected", len(items), len({r.policy for r in items}))
            try:
                tickets, finished, batches = await loop.run_in_executor(
                    self.pool, self.runner.step, [(r.x, r.policy) for r in items], flush)
            except Exception as error:  # every request in the replica hears about it; the next start afresh
                self._fail(error, items)
                continue
            self.waiting.update(zip(tickets, items))
            for stage, rows in batches:
                self.metrics.batch(stage, rows)
            for ticket, (logits, k) in finished.items():
                request = self.waiting.pop(ticket)
                self.metrics.exited(k, request.policy.profile)
                if not request.future.done():  # its caller may have given up
                    request.future.set_result((logits, k))

    def _fail(self, error: Exception, items: Sequence[_Request] = ()) -> None:
        """Fail ``items`` and every request waiting in the runner, and start with a fresh runner."""
        for request in [*items, *self.waiting.values()]:
            if not request.future.done():
                request.future.set_exception(error)
        if self.waiting or items:
            self.runner = self._runner()
        self.waiting.clear()

    def stats(self) -> dict[str, Any]:
        return {"deployment": "model", **self.metrics.snapshot()}
