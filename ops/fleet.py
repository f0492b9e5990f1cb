"""The processes of ``mgpu up`` and the fleet interface between the supervisor and its rolling updates.

:class:`Child` is one supervised process (a worker or the gateway) with its crash record.
:class:`Fleet` is what a rolling update (:mod:`ops.rolling`) needs of the supervisor
(:mod:`ops.supervisor`): its Redis, its worker slots, and starting a worker on a slot.  The two modules
meet here, so that neither imports the other's internals.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis

from common.keys import Keys
from common.settings import WorkerSettings
from ops.procs import spawn

CRASH_LOOP_N = 5
CRASH_LOOP_WINDOW_S = 60.0


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    crashes: list[float] = field(default_factory=list)
    restart_at: float = 0.0
    down: bool = False
    held: bool = False  # a rollout drives this process: no automatic restart
    template: WorkerSettings | None = None  # a worker's settings (None: the gateway)

    def start(self, **extra_env: str) -> None:
        """Start the process; ``extra_env`` applies to this start only, not to restarts."""
        self.proc = spawn(self.args, env={**self.env, **extra_env}, log_path=self.log_path, die_with_parent=True)

    @property
    def worker_id(self) -> str:
        return self.env.get("MGPU_WORKER_ID", self.name)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def poll(self) -> int | None:
        return -1 if self.proc is None else self.proc.poll()

    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def on_exit(self, now: float) -> float | None:
        """Record an exit: the delay before the restart (exponential backoff, 0.5 s doubling up to
        30 s), or None when it crash-loops (``CRASH_LOOP_N`` exits within ``CRASH_LOOP_WINDOW_S``)."""
        self.crashes = [t for t in self.crashes if now - t < CRASH_LOOP_WINDOW_S] + [now]
        if len(self.crashes) >= CRASH_LOOP_N:
            self.down = True
            return None
        return min(30.0, 0.5 * 2 ** (len(self.crashes) - 1))


class Fleet(Protocol):
    """The supervisor as a rolling update sees it: one worker process per slot, which the rollout
    replaces through :meth:`assign`; the processes it starts besides (a surge worker in its gate, an old
    worker draining after a surge) are the rollout's own, until it assigns them."""

    keys: Keys
    registry: redis.Redis  # the fleet's Redis, synchronous, with short timeouts
    registry_refresh_s: float  # how often the gateways read the registry

    def slots(self) -> Sequence[Child]:
        """The worker process of each slot, in slot order."""
        ...

    def assign(self, slot: int, child: Child) -> None:
        """Make ``child`` the worker process of ``slot``."""
        ...

    def spawn_worker(self, slot: int, template: WorkerSettings, *, worker_id: str, gated: bool) -> Child:
        """Start a worker for ``slot`` on ``template``, held (not restarted until the caller clears
        ``held``); ``gated``: in state 'canary' until admitted."""
        ...

    def surge_worker_id(self, slot: int) -> str:
        """A new worker id for a second worker on ``slot``."""
        ...
