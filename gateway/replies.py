"""Routes worker events to the requests waiting in this gateway process.

Workers append every event (chunk, final result, error) for a request to the reply stream of
the gateway that accepted it.  One task per gateway process reads that stream with a single
blocking XREAD, so thousands of requests in flight share one connection.  Several waiters may
wait on one request (an idempotent retry follows its original): each gets every event.  The stream is durable:
after a Redis restart (AOF) or a dropped connection the reader resumes from the last id it saw,
and in case Redis lost data it re-reads each waiter's result key and chunk stream.

On a Redis Cluster a gateway has one reply stream per model (``Keys.replies``: the workers' scripts write it in
the model's slot), and one reader task per model, started by the first request for it.  Elsewhere the one reader
reads through a :class:`common.redis_pipe.RedisPipe` of its own (a blocking read holds its connection): a round
trip per request at low load, at about half redis-py's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis

from common.backoff import Backoff
from common.keys import Keys
from common.records import ReplyKind
from common.redis_conn import TRANSIENT
from common.redis_pipe import RedisPipe, StreamReply, stream_entries
from common.schemas import Chunk

log = logging.getLogger("mgpu.gateway.replies")

Event = tuple[ReplyKind, bytes]  # (a chunk, the result or an error result; its JSON)


@dataclass(eq=False)
class Waiter:
    """One waiting handler: the final event on ``future``, every event on ``queue`` (streaming), and
    ``changed`` set at each event (a follower that reads the durable keys uses it as a wake-up)."""

    request_id: str
    streaming: bool
    future: asyncio.Future[Event]
    model: str = ""  # where its durable result and chunks are (Keys.result, Keys.chunks)
    queue: asyncio.Queue[Event] | None = None
    last_seq: int = 0
    done: bool = field(default=False)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, kind: ReplyKind, payload: bytes) -> None:
        if self.done:
            return
        self.changed.set()
        if kind != ReplyKind.CHUNK:
            self.done = True
            if not self.future.done():
                self.future.set_result((kind, payload))
            if self.queue is not None:
                self.queue.put_nowait((kind, payload))
        elif self.queue is not None:
            self.queue.put_nowait((kind, payload))


@dataclass(eq=False)
class _Reader:
    """One reply stream and where its reading stands."""

    stream: str
    model: str | None  # a cluster's per-model stream; None: the gateway's one stream, for every model
    # From the stream's start: a request may be accepted, and its reply added, before the reader's first read
    # (a reader that began at "$", or at the server's clock when it first ran, missed such a reply and its
    # request hung: seen in CI on a process that had just started).  Entries without a waiter are skipped;
    # the stream is trimmed behind the reader, so what is read again after a restart under the same id is small.
    last_id: str = "0-0"
    healthy: bool = False
    resync_needed: bool = False


class ReplyRouter:
    def __init__(self, client: aioredis.Redis, keys: Keys, gateway_id: str, *, block_ms: int = 1000) -> None:
        self.r = client
        self.keys = keys
        self.gateway_id = gateway_id
        self.block_ms = block_ms
        self.waiters: dict[str, list[Waiter]] = {}
        self.closed = False  # set at shutdown: the loop ends even if a cancellation got lost
        self._main = None if keys.cluster else _Reader(keys.replies(gateway_id, ""), None)
        self.pipe = RedisPipe.of(client, drop_on_cancel=True) if self._main is not None else None
        self._per_model: dict[str, _Reader] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def stream(self) -> str:
        """The reply stream (not on a cluster, where there is one per model)."""
        assert self._main is not None
        return self._main.stream

    @property
    def healthy(self) -> bool:
        readers = [self._main] if self._main is not None else list(self._per_model.values())
        return all(rd.healthy for rd in readers)

    def register(self, request_id: str, streaming: bool, model: str) -> Waiter:
        loop = asyncio.get_running_loop()
        w = Waiter(request_id=request_id, streaming=streaming, future=loop.create_future(),
                   queue=asyncio.Queue() if streaming else None, model=model)
        self.waiters.setdefault(request_id, []).append(w)
        if self._main is None and model not in self._per_model:
            rd = self._per_model[model] = _Reader(self.keys.replies(self.gateway_id, model), model, healthy=True)
            task = asyncio.create_task(self._read(rd), name=f"replies:{model}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return w

    def unregister(self, w: Waiter) -> None:
        ws = self.waiters.get(w.request_id)
        if ws is not None and w in ws:
            ws.remove(w)
            if not ws:
                del self.waiters[w.request_id]

    def __len__(self) -> int:
        """Waiting handlers."""
        return sum(len(ws) for ws in self.waiters.values())

    async def run(self) -> None:
        if self._main is not None:
            await self._read(self._main)
            return
        try:  # a cluster: the per-model readers run as tasks of their own, until this one is cancelled
            await asyncio.get_running_loop().create_future()
        finally:
            for t in list(self._tasks):
                t.cancel()

    async def _read(self, rd: _Reader) -> None:
        backoff = Backoff(0.05, 1.0)
        trimmed_at = 0.0
        loop = asyncio.get_running_loop()
        while not self.closed:
            try:
                if rd.resync_needed:
                    await self._resync(rd)
                rd.healthy = True
                resp = await self._xread(rd)
                backoff.reset()
            except redis.ResponseError as exc:  # UNBLOCKED: the stream moved (a cluster slot migrates)
                if not str(exc).startswith("UNBLOCKED"):
                    raise
                log.info("reply stream read interrupted (%s); reading again", exc)
                rd.resync_needed = True
                continue
            except TRANSIENT as exc:
                if rd.healthy:
                    log.warning("reply stream read failed: %s", exc)
                rd.healthy = False
                rd.resync_needed = True
                await backoff.wait()
                continue
            for _stream, entries in resp or ():
                for entry_id, f in entries:
                    rd.last_id = entry_id.decode()
                    if not f or (rid := f.get(b"r")) is None:
                        continue
                    for w in self.waiters.get(rid.decode(), ()):
                        self._deliver(w, ReplyKind(f[b"k"].decode()), f[b"p"])
            now = loop.time()
            if now - trimmed_at > 5.0:
                trimmed_at = now
                with contextlib.suppress(redis.RedisError, OSError):
                    async with self.r.pipeline(transaction=False) as p:
                        p.xtrim(rd.stream, minid=rd.last_id, approximate=True)
                        p.expire(rd.stream, 3600)
                        await p.execute()

    async def _xread(self, rd: _Reader) -> StreamReply:
        if self.pipe is None or rd is not self._main:
            return await self.r.xread({rd.stream: rd.last_id}, count=2000, block=self.block_ms)  # type: ignore[no-any-return]
        return stream_entries(await self.pipe.call("XREAD", "COUNT", 2000, "BLOCK", self.block_ms, "STREAMS",
                                                   rd.stream, rd.last_id))

    def close(self) -> None:
        self.closed = True
        if self.pipe is not None:
            self.pipe.close()

    def _deliver(self, w: Waiter, kind: ReplyKind, payload: bytes) -> None:
        if kind == ReplyKind.CHUNK and w.queue is not None:
            seq = Chunk.model_validate_json(payload).seq
            if seq <= w.last_seq:
                return  # a duplicate (resync re-read it)
            w.last_seq = seq
        w.deliver(kind, payload)

    async def _resync(self, rd: _Reader) -> None:
        """After a gap in a reply stream: read its waiters' durable state directly."""
        waiters = [w for ws in self.waiters.values() for w in ws
                   if not w.done and (rd.model is None or w.model == rd.model)]
        if not waiters:
            rd.resync_needed = False
            return
        async with self.r.pipeline(transaction=False) as p:
            for w in waiters:
                if w.streaming:
                    p.xrange(self.keys.chunks(w.model, w.request_id))
                p.get(self.keys.result(w.model, w.request_id))
            out = await p.execute()
        i = 0
        for w in waiters:
            if w.streaming:
                for _id, f in out[i]:
                    self._deliver(w, ReplyKind.CHUNK, f[b"c"])
                i += 1
            res = out[i]
            i += 1
            if res is not None:
                self._deliver(w, ReplyKind.FINAL, res)  # the handler reads Result.error either way
        rd.resync_needed = False
        log.info("reply router resynced %d waiters", len(waiters))
