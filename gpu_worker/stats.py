"""A worker's state and counters, in one plain record: written by the worker's loops and its jobs,
read by the metrics collector, ``/health`` and the registry record (:mod:`gpu_worker.registry`).

It holds numbers only (no references to jobs, engines or clients), so the readers depend on this
module alone.  The liveness thread and the metrics server read it from their own threads: each
field is one attribute, written whole, so a reader sees either the old value or the new one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.records import WorkerState


@dataclass
class WorkerStats:
    state: WorkerState = WorkerState.STARTING
    healthy: bool = True  # False once the engine or the GPU failed: the worker leaves rotation
    requests: int = 0  # jobs in flight (requests running here)
    busy_slots: int = 0  # batch slots they take (a request with n choices takes n)
    own_queued: int = 0  # unread entries in the own stream, as of the last heartbeat
    loop_tick: float = field(default_factory=time.monotonic)  # the event loop's last tick (monotonic)
    # counters, from the start of the process
    served: int = 0  # results stored
    failed: int = 0  # error results other than cancelled or timed out
    reclaimed: int = 0  # entries taken over from a worker whose lease lapsed
    fenced: int = 0  # jobs that found another worker owning their entry (a write refused, or the lease lost)
    dead_lettered: int = 0  # entries moved to the dead-letter stream (malformed, or past max_deliveries)
    cancelled: int = 0  # jobs stopped by their client's cancel while they ran
    skipped: int = 0  # cancelled or expired before they reached the engine
    drains: int = 0  # drain requests taken (SIGTERM, ``mgpu drain``, an engine or GPU failure)
    preempted: int = 0  # batch requests handed back to make room for interactive ones (batch_preempt)

    @property
    def loop_lag_s(self) -> float:
        """Seconds since the event loop last ticked."""
        return max(0.0, time.monotonic() - self.loop_tick)

    def job_started(self, slots: int) -> None:
        self.requests += 1
        self.busy_slots += slots

    def job_ended(self, slots: int) -> None:
        self.requests -= 1
        self.busy_slots -= slots

    def free_slots(self, slots: int) -> int:
        """Slots free of an engine with ``slots`` in all."""
        return max(0, slots - self.busy_slots)
