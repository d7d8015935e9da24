"""What each replica counts: requests per exit and profile, rows per stage run, time waiting for a batch.

Exported through Ray Serve's metrics (``ray.serve.metrics``, scraped with Ray's other metrics, each tagged
with its application, deployment and replica by Serve):

- ``dgate_exits`` (counter; tags ``exit``, ``profile``): requests answered at each exit (``num_gates``: the head);
- ``dgate_stage_batch_size`` (histogram; tag ``stage``): rows in each run of a stage (``0``..``num_gates``; a
  whole-model replica of a cascade or the plain model: ``model``), and in a whole-model replica the requests
  each collection took in (``collected``);
- ``dgate_queue_wait_seconds`` (histogram; tag ``stage``): from a request's arrival at a stage (a segment
  replica) or at the replica (``whole``) until its batch started.

Each replica also keeps the same numbers in memory (:meth:`ReplicaMetrics.snapshot`), which the
application's ``stats`` call and ``GET /stats`` return.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
WAIT_BOUNDARIES = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


def profile_tag(profile: str | None) -> str:
    return profile if profile is not None else "-"


class ReplicaMetrics:
    """One replica's counts, in memory and (``ray_metrics``) as Ray Serve metrics."""

    def __init__(self, ray_metrics: bool = True):
        self.exits: Counter[tuple[int, str]] = Counter()
        self.batches: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # stage -> runs, rows, largest, mixed
        self.waits: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # stage -> count, sum, max
        self._ray = None
        if ray_metrics:
            from ray.serve import metrics

            self._ray = (
                metrics.Counter("dgate_exits", "requests answered at each exit", tag_keys=("exit", "profile")),
                metrics.Histogram("dgate_stage_batch_size", "rows in each run of a stage",
                                  boundaries=BATCH_BOUNDARIES, tag_keys=("stage",)),
                metrics.Histogram("dgate_queue_wait_seconds", "seconds from arrival until the request's batch ran",
                                  boundaries=WAIT_BOUNDARIES, tag_keys=("stage",)),
            )

    def exited(self, k: int, profile: str | None) -> None:
        tag = profile_tag(profile)
        self.exits[k, tag] += 1
        if self._ray:
            self._ray[0].inc(1, tags={"exit": str(k), "profile": tag})

    def batch(self, stage: str, rows: int, profiles: int = 1) -> None:
        """A run of ``stage`` on ``rows`` rows of requests under ``profiles`` different policies."""
        runs = self.batches[stage]
        runs[0], runs[1], runs[2], runs[3] = runs[0] + 1, runs[1] + rows, max(runs[2], rows), runs[3] + (profiles > 1)
        if self._ray:
            self._ray[1].observe(rows, tags={"stage": stage})

    def waited(self, stage: str, seconds: float) -> None:
        waits = self.waits[stage]
        waits[0], waits[1], waits[2] = waits[0] + 1, waits[1] + seconds, max(waits[2], seconds)
        if self._ray:
            self._ray[2].observe(seconds, tags={"stage": stage})

    def snapshot(self) -> dict[str, Any]:
        """Exits per gate and profile; per stage its runs, rows, mean and largest batch, and the runs that mixed
        requests of several policies; mean and longest waits."""
        exits: dict[str, dict[str, int]] = defaultdict(dict)
        for (k, profile), n in sorted(self.exits.items()):
            exits[str(k)][profile] = n
        return {
            "exits": dict(exits),
            "batches": {s: {"runs": n, "rows": r, "mean": r / n, "largest": m, "mixed": x}
                        for s, (n, r, m, x) in self.batches.items()},
            "queue_wait_s": {s: {"count": n, "mean": t / n, "max": m} for s, (n, t, m) in self.waits.items()},
        }
