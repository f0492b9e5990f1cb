"""The GPU worker: its lifecycle and its intake.  It pulls requests from its model's streams (and those
of the LoRA adapters it serves) and hands each to a job (:mod:`gpu_worker.job`) that runs it on the
worker's OpenAI server (:mod:`gpu_worker.serving`: vLLM's own, or the simulator's).

Flow of one request::

    XREADGROUP | PULL (up to the free slots, lanes in turn)  ->  server.serve()  ->  EMIT_CHUNK* (streaming)  ->  FINISH

FINISH stores the result (first result wins), tells the waiting gateway, and XACKs + XDELs the
entry, all in one Lua script that first checks this worker still owns the entry (fencing).

Lifecycle: ``announce`` (registered as ``starting`` and heartbeating while the engine loads),
``run`` (``ready``, or ``canary`` until admitted; the intake loops), drain, ``close``.  Intake:
the pull loop (only as many entries as there are free slots), the reclaim loop (entries whose
owner's lease lapsed, and the own streams of gone workers: :mod:`gpu_worker.orphans`), the cancel
loop, and the engine's health loop.

Liveness: a thread (:mod:`gpu_worker.liveness`) heartbeats the registry hash and renews the lease
on every in-flight entry (XCLAIM JUSTID) twice a second.  It stops doing so when the event loop
stalls or the engine is unhealthy, so the entries of a dead, hung or frozen worker pass the lease
(``lease_ms`` idle) and any worker with free slots reclaims them.  Redis's delivery count is the
retry counter; past ``max_deliveries`` the entry goes to the dead-letter stream and the client
gets an explicit error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from typing import Any

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from common import errors
from common.backoff import Backoff
from common.keys import GROUP
from common.records import WorkerState
from common.redis_conn import TRANSIENT
from common.redis_pipe import RedisPipe, stream_entries
from common.schemas import WorkItem
from common.scripts import Claimed, Scripts
from common.settings import SettingsError, WorkerSettings
from gpu_worker.intake import FairIntake
from gpu_worker.job import Job, JobContext, JobRunner, preempt, preemptible
from gpu_worker.liveness import Keeper, Leases, LoopHooks, Lost
from gpu_worker.metrics import WorkerMetrics
from gpu_worker.nvml import Gpu
from gpu_worker.orphans import OwnStreams
from gpu_worker.recent import RecentIds
from gpu_worker.registry import Registry
from gpu_worker.serving.base import OpenAIServer
from gpu_worker.stats import WorkerStats

log = logging.getLogger("mgpu.worker")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Worker:
    def __init__(self, settings: WorkerSettings, server: OpenAIServer, client: aioredis.Redis, *,
                 version: str = "dev", gpu: Gpu | None = None) -> None:
        self.s = settings
        self.server = server
        self.r = client
        self.keys = settings.keys
        self.id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.model = settings.model
        self.scripts = Scripts(client, self.keys)
        self._read_pipe = RedisPipe.of(client, drop_on_cancel=True)  # the pull loop's blocking read (its one user)
        self.own = OwnStreams(client, self.scripts, self.keys, self.model, self.id)
        # read in priority order: what a push strategy sent to this worker, then the model's fair lanes in turn
        # (and, once the server has started, those of the adapters it serves)
        self.intake = FairIntake(self.own.own, self.keys.lanes(self.model), reserve=0,
                                 window_s=settings.fair_window_s)
        # batch work (common.keys.batch_stream: producers and the batch jobs) only in slots that interactive work
        # leaves free beyond a reserve (batch_reserve_slots), read after the interactive streams
        self.batch_streams = [self.keys.batch_stream(self.model)]
        self.batch_reserve = 1
        self._batch_more = False  # the last batch read may have left entries
        self._iread: asyncio.Task[None] | None = None  # an interactive read left waiting while batch work goes on
        self._stream_model = {s: self.model for s in self.streams}  # the model (or adapter) of each stream
        self.stats = WorkerStats()
        self.gpu = gpu or Gpu(settings.gpu)
        self.registry = Registry(client, settings, worker_id=self.id, server=server, stats=self.stats,
                                 gpu_name=self.gpu.name, version=version)
        self.metrics = WorkerMetrics(settings, self.stats, server, self.gpu, worker_id=self.id, version=version)
        self.exit_code = 0
        # (stream, entry id) -> job: an id is unique in its stream only (two streams' entries of one ms: "<ms>-0")
        self.jobs: dict[tuple[str, str], Job] = {}
        self._by_request: dict[str, Job] = {}
        self._cancelled = RecentIds(settings.result_ttl_s)
        self.runner = JobRunner(JobContext(
            worker_id=self.id, settings=settings, client=client, scripts=self.scripts, server=server,
            stats=self.stats, metrics=self.metrics, cancelled=self._cancelled, engine_dead=self._engine_dead))
        self._stop = asyncio.Event()
        self._closing = False  # background loops end even if a cancellation got lost
        self._slot_freed = asyncio.Event()
        self._keeper: Keeper | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._admit_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (f"<Worker {self.id} model={self.model} state={self.stats.state} "
                f"in_flight={self.in_flight}/{self.server.slots} served={self.stats.served}>")

    # ------------------------------------------------------------------ accounting
    @property
    def state(self) -> WorkerState:
        return self.stats.state

    @property
    def in_flight(self) -> int:
        """Busy slots."""
        return self.stats.busy_slots

    @property
    def streams(self) -> list[str]:
        """Every stream this worker reads: its own, the fair lanes, then the batch streams."""
        return [*self.intake.streams, *self.batch_streams]

    def batch_room(self, free: int) -> int:
        """Slots batch work may take now: those of ``free`` beyond the reserve."""
        return free - self.batch_reserve

    @property
    def free_slots(self) -> int:
        return self.stats.free_slots(self.server.slots)

    def _leases(self) -> Leases:
        """In-flight entries by stream, but those being handed back (a renewal would take a released entry's idle
        time back to 0, and it would wait a lease before it ran again).  Called from the keeper thread:
        ``dict.copy`` is atomic."""
        by_stream: dict[str, list[str]] = {}
        for j in self.jobs.copy().values():
            if j.stop_reason != "release":
                by_stream.setdefault(j.stream, []).append(j.entry_id)
        return list(by_stream.items())

    # ------------------------------------------------------------------ lifecycle
    def request_drain(self) -> None:
        if not self._stop.is_set():
            log.info("drain requested", extra={"worker": self.id})
            self.stats.drains += 1
            self.stats.state = WorkerState.DRAINING
            self._stop.set()
            self._slot_freed.set()

    async def announce(self) -> None:
        """Register as ``starting`` and begin heartbeating, before the engine loads (which can
        take minutes): the fleet sees the worker coming, and it takes no work until ``ready``."""
        await self._ensure_groups()
        self.registry.metrics_port = self.metrics.serve(self.s.metrics_host, self.s.metrics_port)
        await self.registry.register()
        self._tick_task = asyncio.create_task(self._tick_loop(), name="tick")
        self._keeper = Keeper(self.s, self.registry, self.stats, self.gpu, leases=self._leases,
                              own_stream=self.own.own, loop=asyncio.get_running_loop(),
                              hooks=LoopHooks(drain=self.request_drain, admit=self.admit, lost=self._on_lost,
                                              unhealthy=self._engine_dead))
        self._keeper.start()

    async def run(self) -> int:
        """Serve until drained (SIGTERM, ``mgpu drain``) or the engine dies; then leave the registry.

        With ``canary_gate`` the worker first serves only its own stream, in state ``canary`` (the
        gateway routes nothing to it), until the ``admit`` key tells it to join the fleet."""
        if self._keeper is None:
            await self.announce()
        if self.s.canary_gate:
            self.stats.state = WorkerState.CANARY
            log.info("worker in canary: serving its own stream only until admitted",
                     extra={"worker": self.id, "revision": self.registry.revision})
        else:
            await self._become_ready()
        tasks = [
            asyncio.create_task(self._pull_loop(), name="pull"),
            asyncio.create_task(self._reclaim_loop(), name="reclaim"),
            asyncio.create_task(self._cancel_loop(), name="cancels"),
            asyncio.create_task(self._health_loop(), name="health"),
        ]
        for t in tasks:
            t.add_done_callback(self._loop_ended)
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
            log.info("worker stopped", extra={"worker": self.id, "served": self.stats.served})
        return self.exit_code

    def admit(self) -> None:
        """The supervisor admitted this worker out of its canary state (the ``admit`` key)."""
        if self.stats.state == WorkerState.CANARY and self._admit_task is None:
            self._admit_task = asyncio.create_task(self._become_ready(), name="admit")

    async def _become_ready(self) -> None:
        """Publish the model's facts (the gateway checks prompt lengths with them), then take client work."""
        if self.stats.state not in (WorkerState.STARTING, WorkerState.CANARY):  # asked to drain meanwhile
            return
        self.stats.state = WorkerState.READY
        reserve = self.s.fair_reserve_slots
        self.intake.reserve = max(1, self.server.slots // 32) if reserve is None else reserve
        self.intake.slots = self.server.slots
        batch_reserve = self.s.batch_reserve_slots
        self.batch_reserve = max(1, self.server.slots // 8) if batch_reserve is None else batch_reserve
        for card in self.server.models():  # adapters: their streams too
            if self.keys.cluster and card.id != self.model:
                raise SettingsError(f"the adapter {card.id!r}: LoRA adapters on a Redis Cluster are not supported "
                                    "yet (their streams would be on other slots than the base model's)")
            lanes = self.keys.lanes(card.id)
            self.intake.add_lanes(lanes)
            for lane in lanes:
                self._stream_model.setdefault(lane, card.id)
            batch = self.keys.batch_stream(card.id)
            if batch not in self.batch_streams:
                self.batch_streams.append(batch)
                self._stream_model[batch] = card.id
        await self._ensure_groups()
        await self.registry.publish_ready()
        self._slot_freed.set()  # the pull loop adds the shared stream at its next read
        log.info("worker ready", extra={"worker": self.id, "model": self.model, "slots": self.server.slots,
                                        "revision": self.registry.revision})

    async def close(self) -> None:
        """Stop heartbeating, deregister and let go of the GPU (idempotent)."""
        self._closing = True
        if self._tick_task is not None:
            self._tick_task.cancel()
            self._tick_task = None
        if self._keeper is not None:
            await asyncio.to_thread(self._keeper.stop, 5)
            self._keeper = None
        if self.stats.state != WorkerState.GONE:
            await self.registry.deregister()
            self.stats.state = WorkerState.GONE
        self.metrics.close()
        self.gpu.close()
        self.scripts.close()
        if self._read_pipe is not None:
            self._read_pipe.close()

    async def _drain(self) -> None:
        if self._iread is not None:  # what it may still take is handed back with the rest below
            self._iread.cancel()
        grace = 0.0 if not self.stats.healthy else self.s.drain_grace_s
        deadline = time.monotonic() + grace
        with contextlib.suppress(redis.RedisError, OSError):
            await self.registry.publish_state(WorkerState.DRAINING)
            await self.own.move_own()  # the gateway no longer pushes here: hand back what waits
        while self.jobs and time.monotonic() < deadline:
            self._slot_freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), max(0.0, deadline - time.monotonic()))
        left = list(self.jobs.values())
        for job in left:
            job.end_early("release")
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

    # ------------------------------------------------------------------ health
    def _on_lost(self, lost: Lost) -> None:
        for stream, entry_id in lost:
            job = self.jobs.get((stream, entry_id))
            if job is not None and not job.finishing and job.stop_reason is None:
                log.warning("lease lost; aborting", extra={"worker": self.id, "entry": entry_id})
                job.end_early("lost")

    async def _tick_loop(self) -> None:
        while not self._closing:
            self.stats.loop_tick = time.monotonic()
            await asyncio.sleep(0.1)

    async def _health_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(1.0)
            try:
                await asyncio.wait_for(self.server.check_health(), timeout=2.0)
            except (TimeoutError, errors.EngineDead) as exc:
                self._engine_dead(f"engine health check failed: {exc!r}")
                return

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """An intake loop that dies of an error must not leave a worker that heartbeats as ready and
        takes nothing: it leaves rotation, hands its entries back and exits non-zero (to be restarted)."""
        if self._closing or task.cancelled() or task.exception() is None:
            return
        log.error("the %s loop died: %r", task.get_name(), task.exception(), exc_info=task.exception(),
                  extra={"worker": self.id})
        self._engine_dead(f"the {task.get_name()} loop died: {task.exception()!r}")

    def _engine_dead(self, why: str) -> None:
        if self.stats.healthy:
            log.error("leaving rotation and stopping: %s", why, extra={"worker": self.id})
            self.stats.healthy = False
            self.exit_code = 3
            self.request_drain()

    # ------------------------------------------------------------------ intake
    async def _pull_loop(self) -> None:
        backoff = Backoff(0.05, 2.0)
        while not self._stop.is_set():
            if not self.stats.healthy:  # out of rotation: take nothing more
                await self._stop.wait()
                break
            free = self.free_slots
            try:
                if self.stats.state != WorkerState.CANARY and await self._beside_interactive(free):
                    continue
            except TRANSIENT as exc:
                log.warning("batch read failed (%s); retrying in %.2fs", exc, backoff.next_delay)
                await backoff.wait()
                continue
            if free <= 0:
                self._slot_freed.clear()
                if self.free_slots <= 0:
                    await self._slot_freed.wait()
                continue
            try:
                if self.stats.state == WorkerState.CANARY:
                    resp = await self.r.xreadgroup(GROUP, self.id, {self.own.own: ">"}, count=free,
                                                   block=self.s.read_block_ms)
                else:
                    resp = await self._read(free)
                backoff.reset()
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self._ensure_groups()
                    continue
                if str(exc).startswith("UNBLOCKED"):  # a stream read was moved away (a cluster slot migrates)
                    log.info("read interrupted (%s); reading again", exc)
                    continue
                raise
            except TRANSIENT as exc:
                log.warning("read failed (%s); retrying in %.2fs", exc, backoff.next_delay)
                await backoff.wait()
                continue
            await self._take(resp, self.free_slots)  # not ``free``: reclaims may have started jobs meanwhile

    async def _beside_interactive(self, free: int) -> bool:
        """Batch work while an interactive read waits (True: this turn of the pull loop was spent here).

        One blocking read cannot serve both kinds: XREADGROUP's COUNT is per stream, and batch work may take only
        the room beyond the reserve.  So when the room is gone but a batch backlog waits, or every slot is taken
        and some run batch work (``batch_preempt``), the interactive read goes on in a task of its own
        (:meth:`_interactive_read`), and this loop takes batch work as slots free up: a finished job's slot is
        refilled at once, not after the read's BLOCK time.  That task's entries start at once, each one taking
        the slot of the batch request started last when none is free (it goes back to its stream)."""
        pending = self._iread is not None and not self._iread.done()
        room = self.batch_room(free)
        if not pending:
            if free > 0 and (room > 0 or not self._batch_more):
                return False  # one read covers both kinds of work
            if free <= 0 and not (self.s.batch_preempt and any(preemptible(self.jobs.values(), self.batch_streams))):
                return False  # full, and nothing to preempt: wait for a slot
            self._iread = asyncio.create_task(self._interactive_read(max(free, 1)), name="interactive-read")
        if room > 0 and self._batch_more and not self._stop.is_set():
            resp = await self.r.xreadgroup(GROUP, self.id, {s: ">" for s in self.batch_streams}, count=room)
            self._batch_more = sum(len(entries) for _s, entries in resp or ()) >= room
            # the slots free now: the interactive read may have started requests while this one waited
            await self._take(resp, self.free_slots)
            return True
        self._slot_freed.clear()
        freed = asyncio.ensure_future(self._slot_freed.wait())
        try:
            assert self._iread is not None
            await asyncio.wait({self._iread, freed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()
        return True

    async def _interactive_read(self, count: int) -> None:
        """Read up to ``count`` interactive entries (blocking); start them, preempting batch work for those that
        find no free slot."""
        try:
            resp = await self.r.xreadgroup(GROUP, self.id, {s: ">" for s in self.intake.streams}, count=count,
                                           block=self.s.read_block_ms)
        except (*TRANSIENT, redis.ResponseError) as exc:  # the pull loop's own reads report and handle these
            log.debug("interactive read failed: %s", exc)
            await asyncio.sleep(0.2)
            return
        n = sum(len(entries) for _s, entries in resp or ())
        if not n:
            return
        short = n - self.free_slots
        out = preempt(self.jobs.values(), self.batch_streams, short) if short > 0 and self.s.batch_preempt else []
        for job in out:
            self.stats.preempted += 1
            log.info("batch request preempted", extra={"worker": self.id, "entry": job.entry_id})
        # the preempted jobs free their slots as their tasks end, a moment after: start these now
        await self._take(resp, max(self.free_slots, n), preempted=len(out))

    async def _read(self, free: int) -> Any:
        """Entries for ``free`` slots (gpu_worker.intake): PULL while the streams may hold more, else a
        blocking read.  Returns them as XREADGROUP does."""
        fair = self.intake
        plan = fair.plan(Counter(j.stream for j in self.jobs.values()))
        if fair.more:
            fair.first, pulled = await self.scripts.pull(
                plan.streams, self.id, free, before=1, lanes=len(fair.lanes), first=fair.first, keep=plan.keep,
                running=plan.running, share=plan.share)
            fair.more = len(pulled) >= free
            if pulled:
                return [(p.stream, [(p.entry_id, p.fields)]) for p in pulled]
        room = self.batch_room(free)
        if room > 0 and self._batch_more:  # a batch backlog: take it without waiting on the interactive streams
            resp = await self.r.xreadgroup(GROUP, self.id, {s: ">" for s in self.batch_streams}, count=room)
            got = sum(len(entries) for _s, entries in resp or ())
            self._batch_more = got >= room
            if got:
                return resp
        streams, count, block = fair.blocking_read(plan, free, self.s.read_block_ms)
        if room > 0:  # batch entries wake the read too, while there is room for them (COUNT is per stream)
            streams, count = [*streams, *self.batch_streams], min(count, room)
        if self._read_pipe is not None:  # the loop's own connection (common.redis_pipe): half redis-py's CPU
            resp = stream_entries(await self._read_pipe.call(
                "XREADGROUP", "GROUP", GROUP, self.id, "COUNT", count, "BLOCK", block, "STREAMS", *streams,
                *(">" for _ in streams)))
        else:
            resp = await self.r.xreadgroup(GROUP, self.id, {s: ">" for s in streams}, count=count, block=block)
        batch = set(self.batch_streams)
        fair.more = any(len(entries) >= count for s, entries in resp or () if _s(s) not in batch)
        self._batch_more = any(len(entries) >= count for s, entries in resp or () if _s(s) in batch)
        return resp

    async def _take(self, resp: Any, free: int, *, preempted: int = 0) -> None:
        """Start what a read returned, up to ``free`` slots, batch entries only in the batch room (interactive
        entries first); hand back the rest (several streams answered at once, or a drain began).  ``preempted``:
        the batch requests handed back to make room for this read's interactive entries (their request log's)."""
        excess: dict[str, list[str]] = {}
        batch = set(self.batch_streams)
        room = self.batch_room(free)
        for stream_b, entries in sorted(resp or (), key=lambda se: _s(se[0]) in batch):
            stream = _s(stream_b)
            is_batch = stream in batch
            for entry_id_b, fields in entries:
                entry_id = _s(entry_id_b)
                took = None
                if free > 0 and (not is_batch or room > 0) and not self._stop.is_set():
                    took = self._start(stream, entry_id, fields or {}, deliveries=1,
                                       limit=room if is_batch else None, preempted=0 if is_batch else preempted)
                if took is None:
                    excess.setdefault(stream, []).append(entry_id)
                else:
                    free -= took
                    room -= took
        for stream, ids in excess.items():
            try:
                await self.scripts.release(stream, self.id, ids)
            except (redis.RedisError, OSError) as exc:  # they stay pending here; past the lease, others take them
                log.warning("could not hand back %d entries: %s", len(ids), exc, extra={"worker": self.id})

    async def _reclaim_loop(self) -> None:
        """Take over entries whose owner stopped renewing their lease (dead, hung or frozen)."""
        while not self._closing:
            await asyncio.sleep(self.s.reclaim_interval_s)
            if self._stop.is_set() or not self.stats.healthy or self.stats.state == WorkerState.CANARY:
                continue  # a canary takes no one else's work
            try:  # own streams of gone workers: unread entries to the shared stream, pending ones here
                orphaned = await self.own.sweep(self.s.reclaim_interval_s)
            except (redis.RedisError, OSError) as exc:
                log.warning("orphan sweep failed: %s", exc)
                orphaned = []
            try:
                # the batch streams only while batch work has room (_reclaimed hands back what exceeds it)
                batch = self.batch_streams if self.batch_room(self.free_slots) > 0 else []
                await self._reclaim(list(dict.fromkeys([*self.intake.streams, *batch, *orphaned])))
            except (redis.RedisError, OSError) as exc:
                log.warning("reclaim failed: %s", exc)

    async def _reclaim(self, streams: list[str]) -> None:
        """One RECLAIM call over every stream per page (one round trip per pass, not one per stream)."""
        cursors = dict.fromkeys(streams, "-")
        for _ in range(16):
            free = self.free_slots
            todo = [s for s, c in cursors.items() if c != "0-0"]
            if free <= 0 or not todo:
                return
            pages = await self.scripts.reclaim_many(todo, self.id, self.s.lease_ms, [cursors[s] for s in todo], free)
            for stream, (cursor, claimed) in zip(todo, pages, strict=True):
                cursors[stream] = cursor
                for c in claimed:
                    await self._reclaimed(stream, c)

    async def _reclaimed(self, stream: str, c: Claimed) -> None:
        self.stats.reclaimed += 1
        log.info("reclaimed entry", extra={"worker": self.id, "entry": c.entry_id, "deliveries": c.deliveries,
                                           "from": c.previous_owner})
        if c.deliveries > self.s.max_deliveries:
            await self.runner.dead_letter(stream, self._model_of(stream), c.entry_id, c.fields, c.deliveries,
                                          reason="max_deliveries", job=self.jobs.get((stream, c.entry_id)))
        else:
            limit = self.batch_room(self.free_slots) if stream in self.batch_streams else None
            if self._start(stream, c.entry_id, c.fields, deliveries=c.deliveries, limit=limit) is None:
                await self.scripts.release(stream, self.id, [c.entry_id])  # batch work larger than its room

    async def _cancel_loop(self) -> None:
        last = f"{int((time.time() - self.s.result_ttl_s) * 1000)}-0"
        backoff = Backoff(0.5, 0.5)
        while not self._closing:
            try:
                resp = await self.r.xread({self.keys.cancels: last}, count=1000, block=1000)
                backoff.reset()
            except TRANSIENT:
                await backoff.wait()
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
            job.end_early("cancelled")

    # ------------------------------------------------------------------ jobs
    def _start(self, stream: str, entry_id: str, fields: dict[Any, Any], *, deliveries: int,
               limit: int | None = None, preempted: int = 0) -> int | None:
        """Start a job for an entry this worker now holds; the slots it takes (0: it runs already); None: not
        started, it needs more than ``limit`` slots (batch work beyond its room: the caller hands it back)."""
        if (stream, entry_id) in self.jobs:
            return 0
        job = Job(stream=stream, entry_id=entry_id, fields=fields, deliveries=deliveries, model=self._model_of(stream),
                  preempted=preempted)
        try:
            job.item = WorkItem.from_fields(fields)
            job.slots = job.item.n
        except (ValidationError, ValueError):
            job.item = None
        if limit is not None and job.slots > limit:
            return None
        self.intake.taken(stream)
        self.jobs[stream, entry_id] = job
        self.stats.job_started(job.slots)
        if job.item is not None:
            self._by_request[job.item.id] = job
        self.metrics.started(job)
        job.task = asyncio.create_task(self.runner.run(job), name=f"job-{entry_id}")
        job.task.add_done_callback(lambda _t: self._forget(job))
        return job.slots

    def _model_of(self, stream: str) -> str:
        """The model (or adapter) whose requests ``stream`` carries (an orphaned own stream: the base model)."""
        return self._stream_model.get(stream, self.model)

    def _forget(self, job: Job) -> None:
        """The job's task is done, however it ended: free its slot (idempotent)."""
        if self.jobs.get((job.stream, job.entry_id)) is job:
            del self.jobs[job.stream, job.entry_id]
            self.stats.job_ended(job.slots)
        if job.item is not None and self._by_request.get(job.item.id) is job:
            del self._by_request[job.item.id]
        self._slot_freed.set()
