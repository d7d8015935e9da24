"""One deployment per segment: stage ``k``'s replicas batch the rows that reach it, from every request.

A request enters at segment 0. Each segment batches what waits for it with ``@serve.batch`` (its own
``max_batch_size`` and ``batch_wait_timeout_s``), runs the stage, answers the rows that leave at its gate
and hands each staying row's features to segment ``k + 1`` through that deployment's handle; the head
answers the rest. So each segment's batch is refilled from the survivors of many requests (E3, SOSP
2024), and each segment scales on its own (``num_replicas``). Imports Ray: loaded by ``serve.app`` only.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ray import serve

from ..core.policy import ExitPolicy
from .metrics import ReplicaMetrics
from .runners import Answer, SegmentRunner
from .spec import load_model, threads


@serve.deployment
class Segment:
    """Stage ``k`` of the model in ``folder`` (``k == num_gates``: the head); ``next_segment``: the handle of
    stage ``k + 1`` (``None`` for the head)."""

    def __init__(self, folder: str, kind: str, k: int, next_segment: Any, max_batch_size: int,
                 batch_wait_timeout_s: float, torch_threads: int | None = None):
        threads(torch_threads)
        self.runner = SegmentRunner(load_model(folder, kind), k)
        self.next, self.stage = next_segment, str(k)
        self.metrics = ReplicaMetrics()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"dgate-segment{k}")  # the event loop keeps batching
        self.run_batch.set_max_batch_size(max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, features: torch.Tensor, policy: ExitPolicy) -> Answer:
        """One request's features at this stage: its answer, from here or from the segments after it."""
        left, value = await self.run_batch((features, policy, time.monotonic()))
        if left:
            self.metrics.exited(self.runner.k, policy.profile)
            return value, self.runner.k
        return await self.next.remote(value, policy)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run_batch(self, rows: list[tuple[torch.Tensor, ExitPolicy, float]]) -> list[tuple[bool, torch.Tensor]]:
        start = time.monotonic()
        for _, _, arrived in rows:
            self.metrics.waited(self.stage, start - arrived)
        self.metrics.batch(self.stage, len(rows), len({policy for _, policy, _ in rows}))
        work = [(features, policy) for features, policy, _ in rows]
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.runner.run, work)

    def stats(self) -> dict[str, Any]:
        return {"deployment": f"segment{self.stage}", **self.metrics.snapshot()}
