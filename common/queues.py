"""Queue state read from Redis: length, consumer-group lag, pending entries, oldest waiting age
and dead letters, per model and stream.  Used by the gateway's metrics and by ``mgpu status``.

One pipelined round trip reads ``XINFO GROUPS``, ``XLEN`` and ``XPENDING`` (summary) for every
stream, and a second one reads the first undelivered entry of each stream that has a backlog
(its id is its enqueue time).  Entries are deleted once acknowledged, so a stream holds exactly
the waiting and the in-progress entries: ``length = lag + pending``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from common.keys import GROUP, Keys


@dataclass
class QueueStats:
    model: str
    stream: str  # the Redis key
    kind: str  # "requests" (the shared stream: fair lane 0) | "lane" (fair lanes 1..) | "batch"
    length: int = 0
    lag: int = 0  # entries not yet delivered to any worker
    pending: int = 0  # delivered, not yet acknowledged (in progress, or held by a dead worker)
    consumers: int = 0
    oldest_waiting_age_s: float = 0.0  # the oldest undelivered entry
    oldest_pending_age_s: float = 0.0  # the oldest in-progress entry (since it was enqueued)


@dataclass
class ModelQueues:
    model: str
    streams: list[QueueStats]
    dead_letters: int = 0


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def entry_age_s(entry_id: str, now: float) -> float:
    """Seconds since an auto-generated stream id ("<ms>-<seq>") was created."""
    try:
        ms = int(entry_id.split("-", 1)[0])
    except ValueError:
        return 0.0
    return max(0.0, now - ms / 1000.0)


async def read_queues(r: aioredis.Redis, keys: Keys, models: list[str], *,
                      now: float | None = None) -> list[ModelQueues]:
    streams: list[QueueStats] = []
    for m in models:
        streams.append(QueueStats(model=m, stream=keys.stream(m), kind="requests"))
        streams += [QueueStats(model=m, stream=lane, kind="lane") for lane in keys.lanes(m)[1:]]
        streams.append(QueueStats(model=m, stream=keys.batch_stream(m), kind="batch"))
    async with r.pipeline(transaction=False) as p:
        for q in streams:
            p.exists(q.stream)
            p.xlen(q.stream)
            p.xinfo_groups(q.stream)
            p.xpending(q.stream, GROUP)
            p.scard(q.stream + ":gc")  # answered entries kept for the lag (common.lua._SAFE_DEL): not queued
        for m in models:
            p.xlen(keys.dlq(m))
        out = await p.execute(raise_on_error=False)
    now = time.time() if now is None else now
    after: list[tuple[QueueStats, str]] = []
    present: list[QueueStats] = []
    for i, q in enumerate(streams):
        exists, length, groups, pending, kept = out[5 * i: 5 * i + 5]
        if isinstance(exists, Exception) or not exists:
            continue
        present.append(q)
        q.length = int(length) if not isinstance(length, Exception) else 0
        q.length = max(0, q.length - (int(kept) if not isinstance(kept, Exception) else 0))
        group = None
        if not isinstance(groups, Exception):
            group = next((g for g in groups if _s(g.get("name")) == GROUP), None)
        if group is None:
            q.lag = q.length
            after.append((q, "-"))
            continue
        q.pending = int(group.get("pending") or 0)
        q.consumers = int(group.get("consumers") or 0)
        lag = group.get("lag")
        q.lag = int(lag) if lag is not None else max(0, q.length - q.pending)
        if not isinstance(pending, Exception) and pending and pending.get("min"):
            q.oldest_pending_age_s = entry_age_s(_s(pending["min"]), now)
        if q.lag > 0:
            after.append((q, "(" + _s(group.get("last-delivered-id") or "0-0")))
    if after:
        async with r.pipeline(transaction=False) as p:
            for q, start in after:
                p.xrange(q.stream, min=start, count=1)
            firsts = await p.execute(raise_on_error=False)
        for (q, _), first in zip(after, firsts):
            if not isinstance(first, Exception) and first:
                q.oldest_waiting_age_s = entry_age_s(_s(first[0][0]), now)
    dlq = out[5 * len(streams):]
    result = []
    for j, m in enumerate(models):
        n = dlq[j]
        result.append(ModelQueues(model=m, streams=[q for q in present if q.model == m],
                                  dead_letters=0 if isinstance(n, Exception) else int(n)))
    return result
