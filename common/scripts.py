"""The queue's Lua scripts (:mod:`common.lua`) behind typed calls: no caller packs KEYS or ARGV.

    enqueue(...)           -> Queued | Duplicate | QueueFull        (gateway)
    emit(entry, ...)       -> bool: written, or False when fenced    (worker, streaming chunks)
    finish(entry, ...)     -> Finish.STORED | DUPLICATE | FENCED     (worker, the result)
    dead_letter(entry,...) -> bool: moved, or False when fenced      (worker)
    reclaim(...)           -> (cursor, [Claimed])                    (worker, entries past their lease)
    release(...)           -> int: entries handed back               (worker, drain)
    move_undelivered(...)  -> (moved, left) | None when the owner lives (worker, own streams)
    renew(pipeline, ...)   queues a RENEW on a sync pipeline          (the worker's liveness thread)

The calls made most (enqueue, emit, finish) go through a :class:`common.batching.ScriptBatcher`, so
concurrent calls share pipelined round trips.  Every entry a worker writes for is named by an
:class:`Entry` (stream, id, this consumer, model), and every write is fenced in the script: a worker
that no longer owns the entry (its lease passed) can write nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import redis
import redis.asyncio as aioredis

from common import lua
from common.batching import ScriptBatcher
from common.keys import GROUP, LANES, Keys
from common.records import ReplyKind
from common.redis_pipe import RedisPipe
from common.schemas import Chunk, IdempotencyRecord, Result


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Queued:
    entry_id: str
    fell_back: bool  # pushed to a worker that was not ready: it went to the shared stream instead
    usage: KeyUsage | None = None  # the API key's minute, with this request in it
    replicas: int | None = None  # with enqueue_wait: the replicas that confirmed the enqueue (WAIT)


@dataclass(frozen=True)
class Duplicate:
    first: IdempotencyRecord  # what the key was first used for


@dataclass(frozen=True)
class QueueFull:
    limit: str  # "entries" | "bytes" | "total_bytes" | "key_share"


@dataclass(frozen=True)
class KeyRefused:
    reason: str  # "unknown" | "revoked" | "expired": the API key cannot be used (any more)


@dataclass(frozen=True)
class RateLimited:
    dimension: str  # "requests" | "tokens" | "inflight"
    used: int
    limit: int
    reset_s: int  # until enough of the minute has passed (inflight: 1)


@dataclass(frozen=True)
class Charge:
    """What a request costs its API key: the key, and the tokens reserved (prompt + max_tokens)."""

    key_id: str
    reserve: int


@dataclass(frozen=True)
class KeyUsage:
    """A key's sliding minute after an admission: requests and tokens counted, requests in flight."""

    requests: int
    tokens: int
    inflight: int
    reset_s: int  # until the oldest request of the minute leaves it


class Finish(IntEnum):
    FENCED = 0  # another worker owns the entry now: nothing written
    STORED = 1  # the result is stored and the entry acknowledged
    DUPLICATE = 2  # acknowledged; an earlier result for the request won


@dataclass(frozen=True)
class Entry:
    """A stream entry a worker holds: where it is, who holds it, and the model (its byte counters)."""

    stream: str
    entry_id: str
    consumer: str
    model: str


@dataclass(frozen=True)
class Pulled:
    stream: str
    entry_id: str
    fields: dict[Any, Any]


@dataclass(frozen=True)
class Claimed:
    entry_id: str
    fields: dict[Any, Any]
    previous_owner: str
    deliveries: int


@dataclass(frozen=True)
class Target:
    """Where the gateway appends a request: a stream, the registry hash of the worker that owns it (''
    for the shared stream), and the model's shared stream."""

    stream: str
    worker_key: str
    shared: str


@dataclass(frozen=True)
class Limits:
    max_entries: int
    max_bytes: int
    max_bytes_total: int
    fair: bool = True  # keyed requests for the shared stream go to fair lanes
    key_share: int = 0  # the most requests one key may have in flight in the lanes (0: no limit)


# ----------------------------------------------------------------------------- the calls


def _refusal(out: list[Any]) -> Duplicate | QueueFull | KeyRefused | RateLimited:
    """An ENQUEUE or ADMIT_KEY refusal (common.lua): what it says."""
    rc, val, *rest = out
    if rc == 0:
        return QueueFull(_text(val))
    if rc == 2:  # an unreadable stored record raises pydantic's ValidationError (a ValueError)
        return Duplicate(IdempotencyRecord.model_validate_json(val))
    if rc == 3:
        return KeyRefused(_text(val))
    return RateLimited(_text(val), int(rest[0]), int(rest[1]), int(rest[2]))


class Scripts:
    """The scripts of one namespace on one client (registered lazily; nothing is sent until used)."""

    def __init__(self, client: aioredis.Redis, keys: Keys, *, enqueue_wait: tuple[int, int] | None = None) -> None:
        """``enqueue_wait``: (replicas, timeout ms) that every enqueue's round trip WAITs for."""
        self.r = client
        self.keys = keys
        self.pipe = RedisPipe.of(client)  # the hot path's round trips (common.redis_pipe); None on a cluster
        self._enqueue = ScriptBatcher(client, lua.ENQUEUE, wait=enqueue_wait, pipe=self.pipe)
        self._emit = ScriptBatcher(client, lua.EMIT_CHUNK, pipe=self.pipe)
        self._finish = ScriptBatcher(client, lua.FINISH, pipe=self.pipe)
        self._dead_letter = client.register_script(lua.DEAD_LETTER)
        self._reclaim = client.register_script(lua.RECLAIM)
        self._release = client.register_script(lua.RELEASE)
        self._move = client.register_script(lua.MOVE_UNDELIVERED)
        self._pull = client.register_script(lua.PULL)
        if keys.cluster:  # API keys' limits in their own slot (lua.ADMIT_KEY)
            self._admit_key = client.register_script(lua.ADMIT_KEY)
            self._refund = client.register_script(lua.REFUND)
            self._settle = client.register_script(lua.SETTLE)

    def close(self) -> None:
        """Close the pipe (the client's pool is its owner's to close)."""
        if self.pipe is not None:
            self.pipe.close()

    async def enqueue(self, model: str, target: Target, payload: str, limits: Limits, *,
                      idempotency_key: str | None = None, record: IdempotencyRecord | None = None,
                      idem_ttl_s: int = 600, charge: Charge | None = None
                      ) -> Queued | Duplicate | QueueFull | KeyRefused | RateLimited:
        k = self.keys
        kid = charge.key_id if charge is not None else ""
        laned = bool(kid) and limits.fair
        none = k.none_for(model)
        reservation, admitted = "", None
        if kid and k.cluster:  # the key's hashes are on another slot: admit there first (lua.ADMIT_KEY)
            assert charge is not None
            rc, *rest = await self._admit_key(keys=[k.api_key(kid), k.rate(kid)], args=[charge.reserve, kid])
            if int(rc) != 1:
                return _refusal([rc, *rest])
            reservation = _text(rest[0])
            admitted = KeyUsage(int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]))
        in_script = kid and not k.cluster
        try:
            out = await self._enqueue(
                keys=[target.stream, idempotency_key or none, target.worker_key or none, target.shared,
                      k.queue_bytes(model), k.queue_bytes_total(model), k.api_key(kid) if in_script else none,
                      k.rate(kid) if in_script else none, k.lane_map(model) if laned else none, k.queue_len(model),
                      *(k.lanes(model)[1:] if laned else ())],
                args=[limits.max_entries, payload, record.model_dump_json() if record is not None else "", idem_ttl_s,
                      limits.max_bytes, limits.max_bytes_total, charge.reserve if charge is not None else 0, kid,
                      none, LANES if laned else 1, limits.key_share, LANES, k.lane_prefix(model),
                      k.worker_stream_prefix(model), k.worker_streams(model), reservation])
        except BaseException:
            if reservation:  # not known to be queued: give the charge back (at worst a request goes uncounted)
                await self._refund(keys=[k.rate(kid)], args=[reservation])
            raise
        out, replicas = out if self._enqueue.wait is not None else (out, None)
        rc, val, *rest = out
        if rc != 1:
            if reservation:
                await self._refund(keys=[k.rate(kid)], args=[reservation])
            return _refusal(out)
        usage = KeyUsage(int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4])) if len(rest) >= 5 else admitted
        return Queued(_text(val), bool(rest and rest[0] == 1), usage, replicas)

    async def pull(self, streams: Sequence[str], consumer: str, n: int, *, before: int, lanes: int, first: int,
                   keep: int, running: Sequence[int], share: Sequence[int]) -> tuple[int, list[Pulled]]:
        """Read up to ``n`` new entries, lanes in turn (lua.PULL): the next first lane, and the entries."""
        per_stream = [v for pair in zip(running, share, strict=True) for v in pair]
        nxt, got = await self._pull(keys=list(streams), args=[GROUP, consumer, n, before, keep, first, lanes,
                                                              *per_stream])
        return int(nxt), [Pulled(streams[int(i) - 1], _text(eid), dict(zip(flat[::2], flat[1::2])))
                          for i, eid, flat in got]

    async def emit(self, entry: Entry, request_id: str, chunk: Chunk, reply_to: str | None, ttl_s: int) -> bool:
        return bool(await self._emit(
            keys=[entry.stream, self.keys.chunks(entry.model, request_id)],
            args=[GROUP, entry.consumer, entry.entry_id, request_id, chunk.model_dump_json(exclude_defaults=True),
                  ttl_s, self.keys.replies(reply_to, entry.model) if reply_to else ""]))

    async def finish(self, entry: Entry, result: Result, kind: ReplyKind, reply_to: str | None,
                     ttl_s: int) -> Finish:
        """Store the result, tell the gateway, acknowledge and delete the entry, and settle what it cost its
        API key (its reservation becomes the usage: ``result.usage``)."""
        k = self.keys
        u = result.usage
        rc, q = await self._finish(
            keys=[entry.stream, k.result(entry.model, result.id), k.queue_bytes(entry.model),
                  k.queue_bytes_total(entry.model), k.lane_map(entry.model), k.queue_len(entry.model)],
            args=[GROUP, entry.consumer, entry.entry_id, result.id, result.model_dump_json(exclude_defaults=True),
                  ttl_s, k.replies(reply_to, entry.model) if reply_to else "", kind.value,
                  "" if k.cluster else k.ns, u.prompt_tokens, u.completion_tokens,
                  "1" if result.error is not None else "0"])
        await self._settle_key(q, u.prompt_tokens, u.completion_tokens, result.error is not None)
        return Finish(int(rc))

    async def _settle_key(self, reservation: Any, prompt: int, completion: int, failed: bool) -> None:
        """Redis Cluster: settle what a finished entry cost its API key, on the key's slot (lua.SETTLE).  A worker
        that dies just before leaves the request counted in flight for its key (docs/deployment.md)."""
        q = _text(reservation)
        if not q:
            return
        kid = q.split(":", 1)[0]
        await self._settle(keys=[self.keys.rate(kid), self.keys.usage(kid)],
                           args=[q, prompt, completion, "1" if failed else "0"])

    async def dead_letter(self, entry: Entry, raw_payload: str, result: Result, reply_to: str | None, *,
                          reason: str, deliveries: int, ttl_s: int, max_dead_letters: int,
                          request_id: str = "") -> bool:
        """Move the entry to the model's dead-letter stream (bounded); answer the request if it has an id."""
        k = self.keys
        moved, q = await self._dead_letter(
            keys=[entry.stream, k.dlq(entry.model), k.result(entry.model, request_id or "-"),
                  k.queue_bytes(entry.model), k.queue_bytes_total(entry.model), k.lane_map(entry.model),
                  k.queue_len(entry.model)],
            args=[GROUP, entry.consumer, entry.entry_id, request_id, raw_payload,
                  result.model_dump_json(exclude_defaults=True), ttl_s,
                  k.replies(reply_to, entry.model) if reply_to else "", reason, deliveries, max_dead_letters,
                  "" if k.cluster else k.ns])
        await self._settle_key(q, 0, 0, True)
        return bool(moved)

    async def reclaim(self, stream: str, consumer: str, min_idle_ms: int, cursor: str,
                      count: int) -> tuple[str, list[Claimed]]:
        """Take up to ``count`` entries idle past ``min_idle_ms``; the next cursor ('0-0': done)."""
        return (await self.reclaim_many([stream], consumer, min_idle_ms, [cursor], count))[0]

    async def reclaim_many(self, streams: Sequence[str], consumer: str, min_idle_ms: int, cursors: Sequence[str],
                           count: int) -> list[tuple[str, list[Claimed]]]:
        """:meth:`reclaim` over several streams in one call, ``count`` entries at most over all of them."""
        out = await self._reclaim(keys=list(streams), args=[GROUP, consumer, min_idle_ms, count, *cursors])
        return [(_text(nxt), [Claimed(_text(eid), dict(zip(flat[::2], flat[1::2])), _text(prev), int(n))
                              for eid, flat, prev, n in claimed]) for nxt, claimed in out]

    async def release(self, stream: str, consumer: str, entry_ids: list[str], idle_ms: int = 10**12) -> int:
        """Hand entries back for immediate reclaim elsewhere, without spending a delivery."""
        if not entry_ids:
            return 0
        return int(await self._release(keys=[stream], args=[GROUP, consumer, idle_ms, *entry_ids]))

    async def move_undelivered(self, model: str, owner: str, mover: str, *, force: bool,
                               batch: int) -> tuple[int, int] | None:
        """Move ``owner``'s unread own-stream entries to the shared stream: (moved, left), or None when
        the owner is alive and ``force`` is off."""
        k = self.keys
        moved, left = await self._move(
            keys=[k.worker_stream(model, owner), k.worker_live(model, owner), k.stream(model), k.worker_streams(model)],
            args=[GROUP, mover, batch, owner, "1" if force else "0"])
        return None if int(moved) < 0 else (int(moved), int(left))


def renew(pipe: redis.client.Pipeline, script: Any, stream: str, consumer: str, entry_ids: list[str]) -> None:
    """Queue a lease renewal of ``entry_ids`` on a sync pipeline; its reply lists the ids lost."""
    script(keys=[stream], args=[GROUP, consumer, *entry_ids], client=pipe)


def renew_script(client: redis.Redis) -> Any:
    return client.register_script(lua.RENEW)
