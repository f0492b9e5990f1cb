"""One job: a stream entry this worker holds, run on the worker's OpenAI server from its first step to its
result.

* :class:`Job`: the record of one entry in flight (where it is, its request, its task, why it
  was stopped early), and :meth:`Job.end_early`, the one way to stop it.
* :class:`JobContext`: all a job may use of its worker (scripts, settings, server, stats,
  metrics, the cancel memory and one callback); a job never touches the worker itself.
* :class:`JobRunner`: the body of a job's task: skip what was cancelled or expired in the queue,
  hand the request to the worker's OpenAI server (:mod:`gpu_worker.serving`; a migrated stream
  with what earlier attempts sent), relay its stream (:class:`_Emitter`), store its answer or an
  error result, dead-letter what cannot run.

Every write goes through a script fenced by ownership (:mod:`common.scripts`): a job whose entry
another worker took writes nothing (:class:`Fenced`).  Stopped early, a job answers ``cancelled``
(the client cancelled), hands its entry back (``release``: a drain), or lets it go (``lost``: its
lease passed); ``timeout`` ends it with a timeout error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Container, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from common import errors
from common.backoff import Backoff
from common.logs import set_request_id
from common.records import ReplyKind
from common.redis_conn import TRANSIENT, refused_by_acl
from common.schemas import PATHS, Chunk, ErrorInfo, Kind, Result, WorkItem
from common.scripts import Entry, Finish, Scripts
from common.settings import WorkerSettings
from gpu_worker.metrics import TokenTimer, WorkerMetrics
from gpu_worker.serving.base import Call, OpenAIServer, Piece, Resumed
from gpu_worker.stats import WorkerStats

log = logging.getLogger("mgpu.worker")
T = TypeVar("T")


class Fenced(Exception):
    """This worker no longer owns the entry (its lease passed and another worker took it)."""


@dataclass(slots=True)
class Job:
    stream: str
    entry_id: str
    fields: dict[Any, Any]
    deliveries: int
    model: str  # the model (or adapter) whose stream it came from
    slots: int = 1
    item: WorkItem | None = None
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None  # "cancelled" | "timeout" | "lost" | "release"
    finishing: bool = False  # the result is being stored (and the entry acknowledged)
    running: bool = False  # its task has taken its first step (before that, cancel() would skip its body)
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)  # the same, as unix time (the result's queue_s)
    first_token_at: float | None = None  # unix time of its first generated token (the request log's ttft_ms)
    preempted: int = 0  # batch requests handed back so that this one could start (the request log's)

    def end_early(self, reason: str) -> None:
        """End the job early for ``reason``.  A job whose task has not taken its first step is not
        cancelled (a task cancelled before its first step never runs its body, so nothing would
        answer the request or free the slot): its first step sees ``stop_reason`` and ends there."""
        if self.stop_reason is not None or self.finishing:
            return
        self.stop_reason = reason
        if self.running and self.task is not None:
            self.task.cancel()


def preemptible(jobs: Iterable[Job], batch_streams: Collection[str]) -> Iterator[Job]:
    """Running batch jobs that may be preempted, the last started first: not a streaming one (a request with
    ``priority`` > 0 may stream; run again, it could send its client other text than it already has)."""
    return (j for j in reversed(list(jobs))
            if j.stream in batch_streams and j.stop_reason is None and not j.finishing
            and not (j.item is not None and j.item.stream))


def preempt(jobs: Iterable[Job], batch_streams: Collection[str], k: int) -> list[Job]:
    """Hand back up to ``k`` batch requests (the last started: the least work lost) for interactive ones: each
    ends early and releases its entry, to run again on whichever worker next has batch room."""
    out = list(itertools.islice(preemptible(jobs, batch_streams), k))
    for job in out:
        job.end_early("release")
    return out


@dataclass(frozen=True)
class JobContext:
    """What jobs may use of their worker."""

    worker_id: str
    settings: WorkerSettings
    client: aioredis.Redis  # reads what earlier attempts streamed
    scripts: Scripts
    server: OpenAIServer
    stats: WorkerStats
    metrics: WorkerMetrics
    cancelled: Container[str]  # request ids cancelled lately
    engine_dead: Callable[[str], None]  # the engine failed: the worker leaves rotation


async def retrying(call: Callable[[], Awaitable[T]], give_up_s: float = 60.0) -> T:
    """Run a fenced script, riding out a Redis outage (restart, failover, out of memory) for up to a
    minute.  The job stays registered meanwhile, so its lease is renewed as soon as Redis is back;
    out of memory passes as results expire and entries are deleted as work finishes."""
    backoff = Backoff(0.05, 1.0, give_up_s=give_up_s)
    while True:
        try:
            return await call()
        except (*TRANSIENT, redis.exceptions.OutOfMemoryError) as exc:
            if backoff.expired():
                raise
            log.warning("redis unavailable (%s); retrying in %.2fs", exc, backoff.next_delay)
            await backoff.wait()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class JobRunner:
    """Runs the jobs of one worker (one runner per worker; nothing per job but the job's own objects)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.ttl_s = ctx.settings.result_ttl_s

    def entry(self, job: Job) -> Entry:
        return Entry(job.stream, job.entry_id, self.ctx.worker_id, job.model)

    async def run(self, job: Job) -> None:
        """The job's task: however it ends, it has answered, handed back or let go of its entry."""
        job.running = True
        set_request_id(job.item.id if job.item is not None else None)
        stats = self.ctx.stats
        try:
            try:
                if job.stop_reason is not None:  # stopped before this first step
                    await self._stopped(job)
                elif job.item is None:
                    await self.dead_letter(job.stream, job.model, job.entry_id, job.fields, job.deliveries,
                                           reason="malformed", job=job)
                else:
                    await self._execute(job, job.item)
            except asyncio.CancelledError:
                if job.stop_reason is None:
                    raise
                await asyncio.shield(self._stopped(job))
        except Fenced:
            stats.fenced += 1
            log.warning("fenced: entry owned by another worker now", extra={"entry": job.entry_id})
        except errors.EngineDead as exc:
            self.ctx.engine_dead(str(exc))
        except (redis.RedisError, OSError) as exc:
            if refused_by_acl(exc):
                # not transient: the worker's Redis user lacks a permission (docs/security.md).  Retrying would
                # loop on every delivery; the worker stops (exit 3) and its entries go to a worker that can.
                self.ctx.engine_dead(f"Redis refused a command to this worker's user (check its ACL): {exc}")
                return
            # Redis is away: the entry stays pending; our lease lapses and it is retried.
            log.warning("redis error in job %s: %s", job.entry_id, exc)
        except Exception as exc:  # the engine failed on this request: tell the client
            log.exception("generation failed", extra={"entry": job.entry_id})
            with contextlib.suppress(Fenced, redis.RedisError, OSError):  # the error result counts it
                await self._finish_error(job, errors.GenerationFailed(f"generation failed: {type(exc).__name__}"))

    async def _execute(self, job: Job, item: WorkItem) -> None:
        if item.id in self.ctx.cancelled:
            self.ctx.stats.skipped += 1
            await self._finish_error(job, errors.RequestCancelled("the client cancelled the request"))
            return
        if item.deadline is not None and time.time() >= item.deadline:
            self.ctx.stats.skipped += 1
            await self._finish_error(job, errors.RequestTimeout("the request's deadline passed in the queue"))
            return
        try:
            timeout = None if item.deadline is None else max(0.0, item.deadline - time.time())
            async with asyncio.timeout(timeout):
                result = await self._serve(job, item)
        except TimeoutError:
            job.stop_reason = "timeout"
            await self._finish_error(job, errors.RequestTimeout("the request's deadline passed"))
            return
        # finishing before the shield's task starts: a cancel that lands while the result is stored
        # is ignored (end_early), instead of cancelling this task into a second, fenced, error result
        job.finishing = True
        await asyncio.shield(self._store(job, result, ReplyKind.FINAL if result.error is None else ReplyKind.ERROR))

    async def _stopped(self, job: Job) -> None:
        """What a job stopped early leaves behind: an answer, a handed-back entry, or nothing (lost)."""
        reason = job.stop_reason
        if reason == "cancelled" and job.item is not None:
            self.ctx.stats.cancelled += 1
            await self._finish_error(job, errors.RequestCancelled("the client cancelled the request"))
        elif reason == "release":
            with contextlib.suppress(redis.RedisError, OSError):
                await self.ctx.scripts.release(job.stream, self.ctx.worker_id, [job.entry_id])
        elif reason == "lost":
            self.ctx.stats.fenced += 1

    # ------------------------------------------------------------------ serving
    async def _serve(self, job: Job, item: WorkItem) -> Result:
        """The request on the worker's OpenAI server: its stream relayed chunk by chunk, its end as a Result."""
        resumed = await self._resume_state(item) if item.stream and job.deliveries > 1 else None
        timers: dict[int, TokenTimer] = {}

        def on_tokens(choice: int, tokens: int, prompt_tokens: int) -> None:
            if job.first_token_at is None:
                job.first_token_at = time.time()
            timer = timers.get(choice)
            if timer is None:
                timer = timers[choice] = self.ctx.metrics.token_timer(item, choice)
            timer.step(tokens, prompt_tokens)

        # a stream whose earlier attempt sent no byte of data (its headers at most) starts over
        call = Call(item=item, attempt_id=f"{item.id}/{job.entry_id}/{job.deliveries}",
                    resumed=resumed if resumed is not None and resumed.sse else None, on_tokens=on_tokens)
        emitter = _Emitter(self.ctx.scripts, self.entry(job), item, resumed.seq if resumed else 0, self.ttl_s)
        reply = None
        try:
            async with contextlib.aclosing(self.ctx.server.serve(call)) as outs:
                async for out in outs:
                    if isinstance(out, Piece):
                        emitter.push(out)
                    else:
                        reply = out
        finally:
            await emitter.close()
        if reply is None:
            raise errors.GenerationFailed("the server ended without an answer")
        if reply.error is not None:  # refused (4xx), or a stream that could not be continued
            self.ctx.stats.failed += 1
        return Result(id=item.id, kind=item.kind, model=item.model, created=item.created, status=reply.status,
                      body=reply.body, error=reply.error, usage=reply.usage, worker=self.ctx.worker_id,
                      attempts=job.deliveries, scope=item.scope,
                      queue_s=round(max(0.0, job.started_at - item.enqueued_at), 4))

    async def _resume_state(self, item: WorkItem) -> Resumed | None:
        """What earlier attempts already streamed (None: nothing, so the request starts over)."""
        entries = await self.ctx.client.xrange(self.ctx.settings.keys.chunks(item.model, item.id))
        seq, sse, tokens = 0, [], {}  # type: ignore[var-annotated]
        continuable = True
        for _id, fields in entries:
            chunk = Chunk.model_validate_json(fields[b"c"])
            if chunk.seq <= seq:
                continue
            seq = chunk.seq
            sse.append(chunk.sse)
            if chunk.tokens is None:
                continuable = False
            else:
                for i, ids in chunk.tokens.items():
                    tokens.setdefault(i, []).extend(ids)
        if not seq:
            return None
        return Resumed(seq=seq, sse="".join(sse), tokens=tokens if continuable else None)

    # ------------------------------------------------------------------ results
    async def _finish_error(self, job: Job, err: errors.MgpuError) -> None:
        item = job.item
        assert item is not None
        if not isinstance(err, errors.RequestCancelled | errors.RequestTimeout):
            self.ctx.stats.failed += 1
        result = Result(id=item.id, kind=item.kind, model=item.model, created=item.created, status=err.status,
                        error=err.to_info(), worker=self.ctx.worker_id, attempts=job.deliveries, scope=item.scope)
        await self._store(job, result, ReplyKind.ERROR)

    async def _store(self, job: Job, result: Result, kind: ReplyKind) -> None:
        item = job.item
        assert item is not None
        job.finishing = True
        entry = self.entry(job)
        rc = await retrying(functools.partial(self.ctx.scripts.finish, entry, result, kind, item.reply_to,
                                              self.ttl_s))
        if rc == Finish.FENCED:
            raise Fenced(job.entry_id)
        if kind == ReplyKind.FINAL:
            self.ctx.stats.served += 1
        self.ctx.metrics.finished(job, result)

    async def dead_letter(self, stream: str, model: str, entry_id: str, fields: dict[Any, Any], deliveries: int, *,
                          reason: str, job: Job | None) -> None:
        """Move an entry that cannot run (``malformed``, or past ``max_deliveries``) to the dead-letter
        stream, and answer its request when the payload names one."""
        if job is not None:
            job.finishing = True
        raw = _s(fields.get(b"p", fields.get("p", b"")) or b"")
        rid, reply, req_model, scope = "", "", "", None
        kind: Kind = "completion"
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            obj = json.loads(raw)
            rid = str(obj.get("id") or "")
            reply = str(obj.get("reply_to") or "")
            if obj.get("kind") in PATHS:
                kind = obj["kind"]
            req_model = str(obj.get("model") or "")
            scope = str(obj["scope"]) if obj.get("scope") else None
        if reason == "malformed":
            err = ErrorInfo(message="malformed request entry on the stream", type="invalid_request_error",
                            code="malformed_entry", status=400)
        else:
            err = errors.DeadLettered(
                f"the request failed on {deliveries - 1} workers and was moved to the dead-letter stream"
            ).to_info()
        result = Result(id=rid or entry_id, kind=kind, model=req_model, status=err.status, error=err,
                        worker=self.ctx.worker_id, attempts=deliveries, scope=scope)
        s = self.ctx.settings
        rc = await self.ctx.scripts.dead_letter(
            Entry(stream, entry_id, self.ctx.worker_id, model), raw, result, reply or None, reason=reason,
            deliveries=deliveries, ttl_s=s.result_ttl_s, max_dead_letters=s.max_dead_letters, request_id=rid)
        if rc:
            self.ctx.stats.dead_lettered += 1
            self.ctx.metrics.dead_lettered()
            log.warning("entry dead-lettered", extra={"entry": entry_id, "reason": reason, "request_id": rid})


class _Emitter:
    """Writes a stream's chunks in order; pieces that arrive while a write is in flight are merged into
    the next chunk, so a busy worker sends fewer, larger chunks."""

    def __init__(self, scripts: Scripts, entry: Entry, item: WorkItem, seq: int, ttl_s: int) -> None:
        self.scripts = scripts
        self.entry = entry
        self.item = item
        self.seq = seq
        self.ttl_s = ttl_s
        self.pending: Piece | None = None
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def push(self, piece: Piece) -> None:
        if self.error is not None:
            raise self.error
        acc = self.pending
        if acc is None:
            self.pending = Piece(piece.sse, None if piece.tokens is None else {i: list(t) for i, t in
                                                                             piece.tokens.items()})
        else:
            acc.sse += piece.sse
            if acc.tokens is None or piece.tokens is None:
                acc.tokens = None
            else:
                for i, ids in piece.tokens.items():
                    acc.tokens.setdefault(i, []).extend(ids)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self.pending is not None:
            piece, self.pending = self.pending, None
            self.seq += 1
            chunk = Chunk(seq=self.seq, sse=piece.sse, tokens=piece.tokens)
            try:
                ok = await retrying(functools.partial(self.scripts.emit, self.entry, self.item.id, chunk,
                                                      self.item.reply_to, self.ttl_s))
            except BaseException as exc:
                self.error = exc
                raise
            if not ok:
                self.error = Fenced(self.entry.entry_id)
                raise self.error

    async def close(self) -> None:
        """Wait for the chunks in flight.  Cancelled meanwhile (the job is stopped early), it still waits
        for the write in flight, and writes nothing more: the job's answer comes after its last chunk."""
        task = self.task
        if task is not None:
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                self.pending = None
                await asyncio.wait([task])
                if not task.cancelled():
                    task.exception()  # retrieved: a fenced write of a stopped job is no error of its own
                raise
        if self.error is not None:
            raise self.error
