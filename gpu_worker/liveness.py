"""The liveness thread (the keeper): heartbeat, lease renewal, the drain and admit flags, and the
own stream's queued count, twice a second, in a thread of its own with its own Redis connection,
so neither the engine nor a busy event loop can starve it.

Each heartbeat is one pipeline (:meth:`Keeper.beat`): the registry record with its TTL, a RENEW of
every in-flight entry per stream (its reply lists the entries another worker holds now), the drain
and admit keys, and the own stream's length.  The replies are read back by name into a
:class:`Beat`.  The keeper stops heartbeating and renewing:

* for good, once the GPU is unhealthy (:meth:`gpu_worker.nvml.Gpu.check`, every heartbeat): the
  worker is told once, and leaves rotation;
* while the event loop has not ticked for ``loop_stall_s`` or the engine is unhealthy: the leases
  lapse, and live workers reclaim the entries.

Whatever the keeper learns goes to the event loop through :class:`LoopHooks`, scheduled with
``call_soon_threadsafe``: nothing of the worker runs in this thread but reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from common.redis_conn import sync_client
from common.scripts import renew, renew_script
from common.settings import WorkerSettings
from gpu_worker.nvml import Gpu
from gpu_worker.registry import Registry
from gpu_worker.stats import WorkerStats

log = logging.getLogger("mgpu.worker")

Leases = list[tuple[str, list[str]]]  # in-flight entry ids, by stream
Lost = list[tuple[str, str]]  # (stream, entry id) of entries whose lease another worker holds now


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class NamedPipeline:
    """A sync pipeline whose replies are read back by name: :meth:`name` names the one command
    queued since the previous call (or, with None, any number whose replies nobody reads)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._names: list[str | None] = []

    def name(self, name: str | None) -> None:
        queued = len(self.pipe) - len(self._names)
        if name is not None and queued != 1:
            raise ValueError(f"{name!r} names {queued} commands, not one")
        self._names.extend([name] * queued)

    def execute(self) -> dict[str, Any]:
        self.name(None)
        return {n: reply for n, reply in zip(self._names, self.pipe.execute(), strict=True) if n is not None}


def _renewal(stream: str) -> str:
    return f"renew {stream}"


@dataclass(frozen=True)
class Beat:
    """What one heartbeat learnt."""

    drain: bool  # the drain key was set (``mgpu drain``)
    admit: bool  # the admit key was set (a rollout admits this canary)
    own_length: int  # entries in the own stream (read or not)
    lost: Lost
    own_kept: int = 0  # of them, answered ones kept for the consumer group's lag

    @classmethod
    def decode(cls, replies: Mapping[str, Any], leases: Leases) -> Beat:
        return cls(drain=bool(replies["drain"]), admit=bool(replies["admit"]), own_length=int(replies["own_length"]),
                   lost=[(stream, _s(i)) for stream, _ids in leases for i in replies[_renewal(stream)]],
                   own_kept=int(replies.get("own_kept") or 0))


@dataclass(frozen=True)
class LoopHooks:
    """What the keeper asks of the event loop; each is scheduled there, never run in the thread."""

    drain: Callable[[], None]
    admit: Callable[[], None]
    lost: Callable[[Lost], None]
    unhealthy: Callable[[str], None]  # why


class Keeper:
    def __init__(self, settings: WorkerSettings, registry: Registry, stats: WorkerStats, gpu: Gpu, *,
                 leases: Callable[[], Leases], own_stream: str, hooks: LoopHooks,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.s = settings
        self.registry = registry
        self.stats = stats
        self.gpu = gpu
        self.leases = leases  # called in the thread: must only read (a dict copy is atomic)
        self.own_stream = own_stream
        self.hooks = hooks
        self.loop = loop
        keys, wid = settings.keys, registry.id
        self._drain_key, self._admit_key = keys.drain(wid), keys.admit(wid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mgpu-lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop and wait up to ``timeout`` seconds for the thread (blocking: run it in a thread)."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        client = sync_client(self.s.redis_dsn, socket_timeout=1.0, socket_connect_timeout=1.0)
        renew_lua = renew_script(client)
        stall_s = self.s.loop_stall_s
        stalled = False
        gpu_problem: str | None = None
        while not self._stop.wait(self.s.heartbeat_interval_s):
            problem = gpu_problem or self.gpu.check()
            if problem is not None:
                if gpu_problem is None:
                    log.error("GPU unhealthy: %s", problem, extra={"worker": self.registry.id})
                    self.loop.call_soon_threadsafe(self.hooks.unhealthy, f"GPU unhealthy: {problem}")
                gpu_problem = problem
                continue  # out of rotation: no heartbeat, no lease renewal
            lag = time.monotonic() - self.stats.loop_tick
            if lag > stall_s and not stalled:
                log.error("event loop stalled for %.1fs: letting the lease lapse", lag)
            stalled = lag > stall_s
            if not self.stats.healthy or stalled:
                continue  # a stalled or sick worker lets its lease lapse
            try:
                leases = self.leases()
                self._act(client, self.beat(client, renew_lua, leases), leases)
            except redis.exceptions.NoScriptError:  # a cluster pipeline does not load scripts (a node restarted)
                with contextlib.suppress(redis.RedisError, OSError):
                    client.script_load(renew_lua.script)
            except (redis.RedisError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)
        client.close()

    def beat(self, client: redis.Redis, renew_lua: Any, leases: Leases) -> Beat:
        """One heartbeat pipeline (one round trip): presence, renewals, flags, the own stream's length."""
        p = NamedPipeline(client.pipeline(transaction=False))
        self.registry.queue_presence(p.pipe)
        p.name(None)
        for stream, ids in leases:
            renew(p.pipe, renew_lua, stream, self.registry.id, ids)
            p.name(_renewal(stream))
        p.pipe.exists(self._drain_key)
        p.name("drain")
        p.pipe.exists(self._admit_key)
        p.name("admit")
        p.pipe.xlen(self.own_stream)
        p.name("own_length")
        p.pipe.scard(self.own_stream + ":gc")  # answered entries kept for the lag (common.lua._SAFE_DEL)
        p.name("own_kept")
        return Beat.decode(p.execute(), leases)

    def _act(self, client: redis.Redis, beat: Beat, leases: Leases) -> None:
        own_jobs = sum(len(ids) for stream, ids in leases if stream == self.own_stream)
        self.stats.own_queued = max(0, beat.own_length - beat.own_kept - own_jobs)
        if beat.drain:
            client.delete(self._drain_key)
            self.loop.call_soon_threadsafe(self.hooks.drain)
        if beat.admit:
            client.delete(self._admit_key)
            self.loop.call_soon_threadsafe(self.hooks.admit)
        if beat.lost:
            self.loop.call_soon_threadsafe(self.hooks.lost, beat.lost)
