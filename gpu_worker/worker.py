"""The GPU worker: pulls requests from its model's streams and runs them on one engine.

Flow of one request::

    XREADGROUP COUNT <free slots>  ->  engine.generate()  ->  EMIT_CHUNK* (streaming)  ->  FINISH

FINISH stores the result (first result wins), tells the waiting gateway, and XACKs + XDELs the
entry, all in one Lua script that first checks this worker still owns the entry (fencing).

Liveness: a thread (which neither the engine nor a busy event loop can starve) heartbeats the
registry hash and renews the lease on every in-flight entry (XCLAIM JUSTID) twice a second.  It
stops doing so when the event loop stalls or the engine is unhealthy, so the entries of a dead,
hung or frozen worker pass the lease (``lease_ms`` idle) and any worker with free slots reclaims
them with XAUTOCLAIM.  Redis's delivery count is the retry counter; past ``max_deliveries`` the
entry goes to the dead-letter stream and the client gets an explicit error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from common import errors
from common.backoff import Backoff
from common.keys import GROUP
from common.logs import set_request_id
from common.records import ModelFacts, ReplyKind, WorkerRecord
from common.schemas import Choice, ChoiceDelta, Chunk, ErrorInfo, Result, TokenLogprob, Usage, WorkItem
from common.scripts import Entry, Finish, Scripts, renew, renew_script
from common.settings import Settings
from gpu_worker.engine.base import Engine, EngineRequest, InvalidEngineRequest
from gpu_worker.gpu_health import GpuHealth
from gpu_worker.metrics import WorkerMetrics
from gpu_worker.orphans import OwnStreams

log = logging.getLogger("mgpu.worker")
T = TypeVar("T")


class _Fenced(Exception):
    """This worker no longer owns the entry (its lease passed and another worker took it)."""


@dataclass
class _Job:
    stream: str
    entry_id: str
    fields: dict[Any, Any]
    deliveries: int
    slots: int = 1
    item: WorkItem | None = None
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None  # "cancelled" | "timeout" | "lost" | "release"
    finishing: bool = False  # the result is being stored (and the entry acknowledged)
    running: bool = False  # its task has taken its first step (before that, cancel() would skip its body)
    started: float = field(default_factory=time.monotonic)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RecentIds:
    """Request ids seen in the last ``ttl_s`` seconds (at most ``cap``): O(1) to add, test and expire."""

    def __init__(self, ttl_s: float, cap: int = 200_000) -> None:
        self.ttl_s = ttl_s
        self.cap = cap
        self._seen: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str, now: float) -> None:
        self._seen[request_id] = now
        self._seen.move_to_end(request_id)
        horizon = now - self.ttl_s
        while self._seen and (len(self._seen) > self.cap or next(iter(self._seen.values())) < horizon):
            self._seen.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._seen

    def __len__(self) -> int:
        return len(self._seen)


class Worker:
    def __init__(self, settings: Settings, engine: Engine, client: aioredis.Redis, *, version: str = "dev",
                 gpu_health: GpuHealth | None = None) -> None:
        self.s = settings
        self.engine = engine
        self.r = client
        self.keys = settings.keys
        self.id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.version = version
        self.revision = settings.effective_revision
        self.model = settings.model
        # read in priority order: what a push strategy sent to this worker, then the shared stream
        self.scripts = Scripts(client, self.keys)
        self.own = OwnStreams(client, self.scripts, self.keys, self.model, self.id)
        self.streams = [self.own.own, self.keys.stream(self.model)]
        self._own_queued = 0  # unread entries in the own stream, as of the last heartbeat
        self.gpu = gpu_health or GpuHealth(settings.gpu)
        self.state = "starting"
        self.healthy = True
        self.exit_code = 0
        self.jobs: dict[str, _Job] = {}  # entry id -> job
        self._by_request: dict[str, _Job] = {}
        self._cancelled = RecentIds(settings.result_ttl_s)
        self._stop = asyncio.Event()
        self._closing = False  # background loops end even if a cancellation got lost
        self._slot_freed = asyncio.Event()
        self._loop_tick = time.monotonic()
        self._keeper_stop = threading.Event()
        self._keeper_thread: threading.Thread | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._admit_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # counters
        self.served = 0
        self.failed = 0
        self.reclaimed = 0
        self.fenced = 0
        self.dead_lettered = 0
        self.cancelled = 0
        self.skipped = 0  # cancelled or expired before they reached the engine
        self.drains = 0
        self.metrics = WorkerMetrics(self)

    def __repr__(self) -> str:
        return (f"<Worker {self.id} model={self.model} state={self.state} "
                f"in_flight={self.in_flight}/{self.engine.slots} served={self.served}>")

    # ------------------------------------------------------------------ accounting
    @property
    def in_flight(self) -> int:
        return sum(j.slots for j in self.jobs.values())

    @property
    def loop_lag_s(self) -> float:
        return max(0.0, time.monotonic() - self._loop_tick)

    @property
    def free_slots(self) -> int:
        return max(0, self.engine.slots - self.in_flight)

    def _lease_snapshot(self) -> list[tuple[str, list[str]]]:
        """In-flight entries by stream.  Called from the keeper thread: ``dict.copy`` is atomic."""
        by_stream: dict[str, list[str]] = {}
        for j in self.jobs.copy().values():
            by_stream.setdefault(j.stream, []).append(j.entry_id)
        return list(by_stream.items())

    # ------------------------------------------------------------------ lifecycle
    def request_drain(self) -> None:
        if not self._stop.is_set():
            log.info("drain requested", extra={"worker": self.id})
            self.drains += 1
            self.state = "draining"
            self._stop.set()
            self._slot_freed.set()

    async def announce(self) -> None:
        """Register as ``starting`` and begin heartbeating, before the engine loads (which can
        take minutes): the fleet sees the worker coming, and it takes no work until ``ready``."""
        self._loop = asyncio.get_running_loop()
        await self._ensure_groups()
        self.metrics.serve(self.s.metrics_host, self.s.metrics_port)
        await self._register()
        self._tick_task = asyncio.create_task(self._tick_loop(), name="tick")
        self._keeper_thread = threading.Thread(target=self._keeper, name="mgpu-lease-keeper", daemon=True)
        self._keeper_thread.start()

    async def run(self) -> int:
        """Serve until drained (SIGTERM, ``mgpu drain``) or the engine dies; then leave the registry.

        With ``canary_gate`` the worker first serves only its own stream, in state ``canary`` (the
        gateway routes nothing to it), until the ``admit`` key tells it to join the fleet."""
        if self._keeper_thread is None:
            await self.announce()
        if self.s.canary_gate:
            self.state = "canary"
            log.info("worker in canary: serving its own stream only until admitted",
                     extra={"worker": self.id, "revision": self.revision})
        else:
            await self._become_ready()
        tasks = [
            asyncio.create_task(self._pull_loop(), name="pull"),
            asyncio.create_task(self._reclaim_loop(), name="reclaim"),
            asyncio.create_task(self._cancel_loop(), name="cancels"),
            asyncio.create_task(self._health_loop(), name="health"),
        ]
        try:
            await self._stop.wait()
            await self._drain()
        finally:
            self._closing = True
            if self._admit_task is not None:
                tasks.append(self._admit_task)
            for t in tasks:
                t.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=3.0)
            for t in stuck:
                log.error("background task %s did not stop: %s", t.get_name(), t.get_stack(limit=5))
            await self.close()
            log.info("worker stopped", extra={"worker": self.id, "served": self.served})
        return self.exit_code

    def admit(self) -> None:
        """The supervisor admitted this worker out of its canary state (the ``admit`` key)."""
        if self.state == "canary" and self._admit_task is None:
            self._admit_task = asyncio.create_task(self._become_ready(), name="admit")

    async def _become_ready(self) -> None:
        """Publish the model's facts (the gateway checks prompt lengths with them), then take client work."""
        if self.state not in ("starting", "canary"):  # asked to drain meanwhile
            return
        self.state = "ready"
        info = ModelFacts(max_model_len=self.engine.max_model_len, engine=self.engine.name,
                          tokenizer=getattr(self.engine, "tokenizer_spec", self.engine.name)).model_dump_json()
        with contextlib.suppress(redis.RedisError, OSError):
            async with self.r.pipeline(transaction=True) as p:
                p.hset(self.keys.models, self.model, info)
                p.hset(self.keys.worker(self.id), "state", "ready")
                await p.execute()
        self._slot_freed.set()  # the pull loop adds the shared stream at its next read
        log.info("worker ready", extra={"worker": self.id, "model": self.model, "slots": self.engine.slots,
                                        "revision": self.revision})

    async def close(self) -> None:
        """Stop heartbeating and deregister (idempotent)."""
        self._closing = True
        if self._tick_task is not None:
            self._tick_task.cancel()
            self._tick_task = None
        self._keeper_stop.set()
        if self._keeper_thread is not None:
            await asyncio.to_thread(self._keeper_thread.join, 5)
            self._keeper_thread = None
        if self.state != "gone":
            await self._deregister()
            self.state = "gone"
        self.metrics.close()

    async def _drain(self) -> None:
        grace = 0.0 if not self.healthy else self.s.drain_grace_s
        deadline = time.monotonic() + grace
        with contextlib.suppress(redis.RedisError, OSError):
            await self.r.hset(self.keys.worker(self.id), "state", "draining")
            await self.own.move_own()  # the gateway no longer pushes here: hand back what waits
        while self.jobs and time.monotonic() < deadline:
            self._slot_freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), max(0.0, deadline - time.monotonic()))
        left = list(self.jobs.values())
        for job in left:
            self._end_early(job, "release")
        if left:
            await asyncio.gather(*(j.task for j in left if j.task is not None), return_exceptions=True)
        await self._release_all()

    async def _release_all(self) -> None:
        """Hand back every entry this consumer still holds, for immediate reclaim elsewhere."""
        for stream in self.streams:
            try:
                pending = await self.r.xpending_range(stream, GROUP, "-", "+", 10_000, consumername=self.id)
                ids = [_s(p["message_id"]) for p in pending]
                if ids:
                    n = await self.scripts.release(stream, self.id, ids)
                    log.info("released entries", extra={"worker": self.id, "count": n})
            except (redis.RedisError, OSError) as exc:
                log.warning("could not release entries: %s", exc)

    async def _ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def record(self) -> WorkerRecord:
        """This worker's registry record, as of now."""
        return WorkerRecord(
            id=self.id, host=socket.gethostname(), pid=os.getpid(), gpu="" if self.s.gpu is None else str(self.s.gpu),
            gpu_name=self.gpu.name, model=self.model, engine=self.engine.name, version=self.version,
            revision=self.revision, slots=self.engine.slots, in_flight=self.in_flight, state=self.state,
            heartbeat=round(time.time(), 3), max_model_len=self.engine.max_model_len, served=self.served,
            metrics_port=self.metrics.port, failed=self.failed,
            metrics_host=self.s.metrics_host if self.s.metrics_host not in ("", "0.0.0.0", "::")
            else socket.gethostname(),
            cancelled=self.cancelled, skipped=self.skipped, reclaimed=self.reclaimed, fenced=self.fenced,
            dead_lettered=self.dead_lettered, engine_aborts=self.engine.aborts,
            weight=self.s.weight or self.engine.slots, queued=self._own_queued)

    async def _register(self) -> None:
        key = self.keys.worker(self.id)
        async with self.r.pipeline(transaction=True) as p:
            p.hset(key, mapping=self.record().to_hash())
            p.pexpire(key, int(self.s.worker_ttl_s * 1000))
            p.sadd(self.keys.workers, self.id)
            p.sadd(self.keys.worker_streams(self.model), self.id)
            p.hincrby(self.keys.worker_starts, self.id, 1)
            await p.execute()

    async def _deregister(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            async with self.r.pipeline(transaction=True) as p:
                p.delete(self.keys.worker(self.id))
                p.srem(self.keys.workers, self.id)
                await p.execute()

    # ------------------------------------------------------------------ liveness
    def _keeper(self) -> None:
        """Heartbeat + lease renewal, in a thread of its own with its own connection."""
        client = redis.Redis.from_url(self.s.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        renew_lua = renew_script(client)
        stall_s = self.s.loop_stall_s
        stalled = False
        gpu_problem: str | None = None
        key = self.keys.worker(self.id)
        ttl_ms = int(self.s.worker_ttl_s * 1000)
        while not self._keeper_stop.wait(self.s.heartbeat_interval_s):
            problem = gpu_problem or self.gpu.check()
            if problem is not None:
                if gpu_problem is None and self._loop is not None:
                    log.error("GPU unhealthy: %s", problem, extra={"worker": self.id})
                    self._loop.call_soon_threadsafe(self._engine_dead, f"GPU unhealthy: {problem}")
                gpu_problem = problem
                continue  # out of rotation: no heartbeat, no lease renewal
            lag = time.monotonic() - self._loop_tick
            if lag > stall_s and not stalled:
                log.error("event loop stalled for %.1fs: letting the lease lapse", lag)
            stalled = lag > stall_s
            if not self.healthy or stalled:
                continue  # a stalled or sick worker lets its lease lapse
            try:
                snapshot = self._lease_snapshot()
                p = client.pipeline(transaction=False)
                p.hset(key, mapping=self.record().to_hash())
                p.pexpire(key, ttl_ms)
                p.sadd(self.keys.workers, self.id)
                p.exists(self.keys.drain(self.id))
                for stream, ids in snapshot:
                    renew(p, renew_lua, stream, self.id, ids)
                p.sadd(self.keys.worker_streams(self.model), self.id)
                p.xlen(self.own.own)
                p.exists(self.keys.admit(self.id))
                out = p.execute()
                own_jobs = sum(len(ids) for stream, ids in snapshot if stream == self.own.own)
                self._own_queued = max(0, int(out[-2]) - own_jobs)
                if out[3] and self._loop is not None:
                    client.delete(self.keys.drain(self.id))
                    self._loop.call_soon_threadsafe(self.request_drain)
                if out[-1] and self._loop is not None:
                    client.delete(self.keys.admit(self.id))
                    self._loop.call_soon_threadsafe(self.admit)
                lost = [(stream, _s(i)) for (stream, _), res in zip(snapshot, out[4:]) for i in res]
                if lost and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._on_lost, lost)
            except (redis.RedisError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)
        client.close()

    def _on_lost(self, lost: list[tuple[str, str]]) -> None:
        for _stream, entry_id in lost:
            job = self.jobs.get(entry_id)
            if job is not None and not job.finishing and job.stop_reason is None:
                log.warning("lease lost; aborting", extra={"worker": self.id, "entry": entry_id})
                self._end_early(job, "lost")

    async def _tick_loop(self) -> None:
        while not self._closing:
            self._loop_tick = time.monotonic()
            await asyncio.sleep(0.1)

    async def _health_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(1.0)
            try:
                await asyncio.wait_for(self.engine.check_health(), timeout=2.0)
            except (TimeoutError, errors.EngineDead) as exc:
                self._engine_dead(f"engine health check failed: {exc!r}")
                return

    def _engine_dead(self, why: str) -> None:
        if self.healthy:
            log.error("engine dead, stopping: %s", why, extra={"worker": self.id})
            self.healthy = False
            self.exit_code = 3
            self.request_drain()

    # ------------------------------------------------------------------ intake
    async def _pull_loop(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            if not self.healthy:  # out of rotation: take nothing more
                await self._stop.wait()
                break
            free = self.free_slots
            if free <= 0:
                self._slot_freed.clear()
                if self.free_slots <= 0:
                    await self._slot_freed.wait()
                continue
            try:
                streams = [self.own.own] if self.state == "canary" else self.streams
                resp = await self.r.xreadgroup(GROUP, self.id, {s: ">" for s in streams},
                                               count=free, block=self.s.read_block_ms)
                backoff = 0.05
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self._ensure_groups()
                    continue
                raise
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("read failed (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            excess: dict[str, list[str]] = {}
            for stream_b, entries in resp or ():
                stream = _s(stream_b)
                for entry_id_b, fields in entries:
                    entry_id = _s(entry_id_b)
                    if free > 0 and not self._stop.is_set():
                        free -= self._start(stream, entry_id, fields or {}, deliveries=1)
                    else:
                        excess.setdefault(stream, []).append(entry_id)
            for stream, ids in excess.items():  # several streams answered at once: hand back the rest
                await self.scripts.release(stream, self.id, ids)

    async def _reclaim_loop(self) -> None:
        """Take over entries whose owner stopped renewing their lease (dead, hung or frozen)."""
        while not self._closing:
            await asyncio.sleep(self.s.reclaim_interval_s)
            if self._stop.is_set() or not self.healthy or self.state == "canary":
                continue  # a canary takes no one else's work
            try:  # own streams of gone workers: unread entries to the shared stream, pending ones here
                orphaned = await self.own.sweep()
            except (redis.RedisError, OSError) as exc:
                log.warning("orphan sweep failed: %s", exc)
                orphaned = []
            for stream in [*self.streams, *orphaned]:
                try:
                    await self._reclaim(stream)
                except (redis.RedisError, OSError) as exc:
                    log.warning("reclaim failed: %s", exc)

    async def _reclaim(self, stream: str) -> None:
        cursor = "-"
        for _ in range(16):
            free = self.free_slots
            if free <= 0:
                return
            cursor, claimed = await self.scripts.reclaim(stream, self.id, self.s.lease_ms, cursor, free)
            for c in claimed:
                self.reclaimed += 1
                log.info("reclaimed entry", extra={"worker": self.id, "entry": c.entry_id,
                                                   "deliveries": c.deliveries, "from": c.previous_owner})
                if c.deliveries > self.s.max_deliveries:
                    await self._to_dead_letter(stream, c.entry_id, c.fields, c.deliveries, reason="max_deliveries")
                else:
                    self._start(stream, c.entry_id, c.fields, deliveries=c.deliveries)
            if cursor == "0-0":
                return

    async def _cancel_loop(self) -> None:
        last = f"{int((time.time() - self.s.result_ttl_s) * 1000)}-0"
        while not self._closing:
            try:
                resp = await self.r.xread({self.keys.cancels: last}, count=1000, block=1000)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                await asyncio.sleep(0.5)
                continue
            now = time.monotonic()
            for _stream, entries in resp or ():
                for entry_id, fields in entries:
                    last = _s(entry_id)
                    self.on_cancel(_s(fields.get(b"r", b"")), now)

    def on_cancel(self, request_id: str, now: float) -> None:
        """A client cancelled ``request_id``: stop it if it runs here, skip it if it arrives later."""
        self._cancelled.add(request_id, now)
        job = self._by_request.get(request_id)
        if job is not None:
            self._end_early(job, "cancelled")

    # ------------------------------------------------------------------ jobs
    def _end_early(self, job: _Job, reason: str) -> None:
        """End a job early for ``reason``.  A job whose task has not taken its first step is not
        cancelled (a task cancelled before its first step never runs its body, so nothing would
        answer the request or free the slot): its first step sees ``stop_reason`` and ends there."""
        if job.stop_reason is not None or job.finishing:
            return
        job.stop_reason = reason
        if job.running and job.task is not None:
            job.task.cancel()

    def _forget(self, job: _Job) -> None:
        """The job's task is done, however it ended: free its slot (idempotent)."""
        if self.jobs.get(job.entry_id) is job:
            del self.jobs[job.entry_id]
        if job.item is not None and self._by_request.get(job.item.id) is job:
            del self._by_request[job.item.id]
        self._slot_freed.set()

    def _start(self, stream: str, entry_id: str, fields: dict[Any, Any], *, deliveries: int) -> int:
        if entry_id in self.jobs:
            return 0
        job = _Job(stream=stream, entry_id=entry_id, fields=fields, deliveries=deliveries)
        try:
            job.item = WorkItem.from_fields(fields)
            job.slots = max(1, job.item.params.n)
        except (ValidationError, ValueError):
            job.item = None
        self.jobs[entry_id] = job
        if job.item is not None:
            self._by_request[job.item.id] = job
        self.metrics.started(job)
        job.task = asyncio.create_task(self._run_job(job), name=f"job-{entry_id}")
        job.task.add_done_callback(lambda _t: self._forget(job))
        return job.slots

    async def _run_job(self, job: _Job) -> None:
        job.running = True
        set_request_id(job.item.id if job.item is not None else None)
        try:
            try:
                if job.stop_reason is not None:  # stopped before this first step
                    await self._stopped(job)
                elif job.item is None:
                    await self._to_dead_letter(job.stream, job.entry_id, job.fields, job.deliveries,
                                               reason="malformed")
                else:
                    await self._execute(job, job.item)
            except asyncio.CancelledError:
                if job.stop_reason is None:
                    raise
                await asyncio.shield(self._stopped(job))
        except _Fenced:
            self.fenced += 1
            log.warning("fenced: entry owned by another worker now", extra={"entry": job.entry_id})
        except errors.EngineDead as exc:
            self._engine_dead(str(exc))
        except (redis.RedisError, OSError) as exc:
            # Redis is away: the entry stays pending; our lease lapses and it is retried.
            log.warning("redis error in job %s: %s", job.entry_id, exc)
        except Exception as exc:  # the engine failed on this request: tell the client
            log.exception("generation failed", extra={"entry": job.entry_id})
            self.failed += 1
            with contextlib.suppress(_Fenced, redis.RedisError, OSError):
                await self._finish_error(job, errors.GenerationFailed(f"generation failed: {type(exc).__name__}"))

    async def _execute(self, job: _Job, item: WorkItem) -> None:
        if item.id in self._cancelled:
            self.skipped += 1
            await self._finish_error(job, errors.RequestCancelled("the client cancelled the request"))
            return
        if item.deadline is not None and time.time() >= item.deadline:
            self.skipped += 1
            await self._finish_error(job, errors.RequestTimeout("the request's deadline passed in the queue"))
            return
        try:
            timeout = None if item.deadline is None else max(0.0, item.deadline - time.time())
            async with asyncio.timeout(timeout):
                result = await self._generate(job, item)
        except TimeoutError:
            job.stop_reason = "timeout"
            await self._finish_error(job, errors.RequestTimeout("the request's deadline passed"))
            return
        except InvalidEngineRequest as exc:
            await self._finish_error(job, errors.InvalidRequest(str(exc), param="messages"
                                                                if item.kind == "chat" else "prompt"))
            return
        await asyncio.shield(self._store(job, result, ReplyKind.FINAL))

    async def _stopped(self, job: _Job) -> None:
        """What a job stopped early leaves behind: an answer, a handed-back entry, or nothing (lost)."""
        reason = job.stop_reason
        if reason == "cancelled" and job.item is not None:
            self.cancelled += 1
            await self._finish_error(job, errors.RequestCancelled("the client cancelled the request"))
        elif reason == "release":
            await self._release_entry(job)
        elif reason == "lost":
            self.fenced += 1

    async def _release_entry(self, job: _Job) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            await self.scripts.release(job.stream, self.id, [job.entry_id])

    async def _resume_state(self, item: WorkItem) -> tuple[dict[int, ChoiceDelta], int]:
        """What earlier attempts already streamed: per choice text/tokens/finish, and the last seq."""
        entries = await self.r.xrange(self.keys.chunks(item.id))
        done: dict[int, ChoiceDelta] = {}
        seq = 0
        for _id, fields in entries:
            chunk = Chunk.model_validate_json(fields[b"c"])
            if chunk.seq <= seq:
                continue
            seq = chunk.seq
            for d in chunk.choices:
                acc = done.setdefault(d.index, ChoiceDelta(index=d.index, token_ids=[]))
                acc.text += d.text
                acc.token_ids = (acc.token_ids or []) + (d.token_ids or [])
                acc.finish_reason = d.finish_reason or acc.finish_reason
        return done, seq

    async def _generate(self, job: _Job, item: WorkItem) -> Result:
        params = item.params
        prompt_tokens = self.engine.count_prompt_tokens(item.prompt, item.messages)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.engine.max_model_len - prompt_tokens
        if prompt_tokens + max_tokens > self.engine.max_model_len:
            raise InvalidEngineRequest(
                f"this model's maximum context length is {self.engine.max_model_len} tokens; the request "
                f"has {prompt_tokens} prompt tokens and asks for {max_tokens} completion tokens")
        resumed: dict[int, ChoiceDelta] = {}
        seq = 0
        if item.stream and job.deliveries > 1:
            resumed, seq = await self._resume_state(item)
        emitter = _Emitter(self, job, item, seq) if item.stream else None
        choices: list[Choice] = []
        completion_tokens = 0

        async def one(index: int) -> None:
            nonlocal completion_tokens, prompt_tokens
            prev = resumed.get(index, ChoiceDelta(index=index, token_ids=[]))
            text, tokens = prev.text, list(prev.token_ids or [])
            finish = prev.finish_reason
            lps: list[TokenLogprob] = []
            if finish is None:
                timer = self.metrics.token_timer(item, index)
                p = params.model_copy(update={"n": 1, "max_tokens": max_tokens - len(tokens),
                                              "seed": None if params.seed is None else params.seed + index})
                req = EngineRequest(request_id=f"{item.id}/{index}/{job.entry_id}/{job.deliveries}",
                                    prompt=item.prompt, messages=item.messages, params=p,
                                    resume_token_ids=tokens, resume_text=text)
                if max_tokens - len(tokens) <= 0:
                    finish = "length"
                else:
                    async with contextlib.aclosing(self.engine.generate(req)) as outs:
                        async for out in outs:
                            timer.step(len(out.token_ids), out.prompt_tokens)
                            text += out.text
                            tokens.extend(out.token_ids)
                            prompt_tokens = out.prompt_tokens
                            if out.logprobs:
                                lps.extend(out.logprobs)
                            finish = out.finish_reason
                            if emitter is not None:
                                emitter.push(ChoiceDelta(index=index, text=out.text, token_ids=out.token_ids,
                                                         finish_reason=out.finish_reason, logprobs=out.logprobs))
            completion_tokens += len(tokens)
            choices.append(Choice(index=index, text=text, finish_reason=finish or "stop",
                                  logprobs=lps if params.logprobs is not None else None))

        try:
            if params.n == 1:
                await one(0)
            else:
                async with asyncio.TaskGroup() as tg:
                    for i in range(params.n):
                        tg.create_task(one(i))
        finally:
            if emitter is not None:
                await emitter.close()
        choices.sort(key=lambda c: c.index)
        return Result(id=item.id, kind=item.kind, model=item.model, created=item.created, choices=choices,
                      usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=prompt_tokens + completion_tokens),
                      worker=self.id, attempts=job.deliveries, scope=item.scope)

    async def _finish_error(self, job: _Job, err: errors.MgpuError) -> None:
        item = job.item
        assert item is not None
        if not isinstance(err, errors.RequestCancelled | errors.RequestTimeout):
            self.failed += 1
        result = Result(id=item.id, kind=item.kind, model=item.model, created=item.created,
                        error=err.to_info(), worker=self.id, attempts=job.deliveries, scope=item.scope)
        await self._store(job, result, ReplyKind.ERROR)

    def entry(self, job: _Job) -> Entry:
        return Entry(job.stream, job.entry_id, self.id, self.model)

    async def _store(self, job: _Job, result: Result, kind: ReplyKind) -> None:
        item = job.item
        assert item is not None
        job.finishing = True
        rc = await retrying(lambda: self.scripts.finish(self.entry(job), result, kind, item.reply_to,
                                                        self.s.result_ttl_s))
        if rc == Finish.FENCED:
            raise _Fenced(job.entry_id)
        if kind == ReplyKind.FINAL:
            self.served += 1
        self.metrics.finished(job, result)

    async def _to_dead_letter(self, stream: str, entry_id: str, fields: dict[Any, Any], deliveries: int,
                              *, reason: str) -> None:
        job = self.jobs.get(entry_id)
        if job is not None:
            job.finishing = True
        raw = _s(fields.get(b"p", fields.get("p", b"")) or b"")
        rid, reply, kind, model, scope = "", "", "completion", "", None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            obj = json.loads(raw)
            rid = str(obj.get("id") or "")
            reply = str(obj.get("reply_to") or "")
            kind = obj.get("kind") if obj.get("kind") in ("chat", "completion") else "completion"
            model = str(obj.get("model") or "")
            scope = str(obj["scope"]) if obj.get("scope") else None
        if reason == "malformed":
            err = ErrorInfo(message="malformed request entry on the stream", type="invalid_request_error",
                            code="malformed_entry", status=400)
        else:
            err = errors.DeadLettered(
                f"the request failed on {deliveries - 1} workers and was moved to the dead-letter stream"
            ).to_info()
        result = Result(id=rid or entry_id, kind="chat" if kind == "chat" else "completion", model=model,
                        error=err, worker=self.id, attempts=deliveries, scope=scope)
        rc = await self.scripts.dead_letter(
            Entry(stream, entry_id, self.id, self.model), raw, result, reply or None, reason=reason,
            deliveries=deliveries, ttl_s=self.s.result_ttl_s, max_dead_letters=self.s.max_dead_letters,
            request_id=rid)
        if rc:
            self.dead_lettered += 1
            self.metrics.dead_lettered()
            log.warning("entry dead-lettered", extra={"entry": entry_id, "reason": reason, "request_id": rid})


async def retrying(call: Callable[[], Awaitable[T]], give_up_s: float = 60.0) -> T:
    """Run a fenced script, riding out a Redis outage (restart, failover, out of memory) for up to a
    minute.  The job stays registered meanwhile, so its lease is renewed as soon as Redis is back;
    out of memory passes as results expire and entries are deleted as work finishes."""
    backoff = Backoff(0.05, 1.0, give_up_s=give_up_s)
    while True:
        try:
            return await call()
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError, OSError) as exc:
            if backoff.expired():
                raise
            log.warning("redis unavailable (%s); retrying in %.2fs", exc, backoff.next_delay)
            await backoff.wait()


class _Emitter:
    """Writes a streaming request's chunks in order; deltas that arrive while a write is in
    flight are merged into the next chunk, so a busy worker sends fewer, larger chunks."""

    def __init__(self, worker: Worker, job: _Job, item: WorkItem, seq: int) -> None:
        self.w = worker
        self.job = job
        self.item = item
        self.seq = seq
        self.pending: dict[int, ChoiceDelta] = {}
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def push(self, d: ChoiceDelta) -> None:
        if self.error is not None:
            raise self.error
        acc = self.pending.get(d.index)
        if acc is None:
            self.pending[d.index] = d.model_copy()
        else:
            acc.text += d.text
            acc.token_ids = (acc.token_ids or []) + (d.token_ids or [])
            acc.finish_reason = d.finish_reason or acc.finish_reason
            if d.logprobs:
                acc.logprobs = (acc.logprobs or []) + d.logprobs
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        w = self.w
        while self.pending:
            deltas, self.pending = self.pending, {}
            self.seq += 1
            chunk = Chunk(seq=self.seq, choices=sorted(deltas.values(), key=lambda d: d.index))
            try:
                ok = await retrying(functools.partial(w.scripts.emit, w.entry(self.job), self.item.id, chunk,
                                                      self.item.reply_to, w.s.result_ttl_s))
            except BaseException as exc:
                self.error = exc
                raise
            if not ok:
                self.error = _Fenced(self.job.entry_id)
                raise self.error

    async def close(self) -> None:
        if self.task is not None:
            await asyncio.shield(self.task)
        if self.error is not None:
            raise self.error
