"""Own streams of gone workers: nothing pushed to a worker may be stranded when it dies or drains.

Each worker registers its own stream in ``Keys.worker_streams(model)``.  Every live worker's
reclaim loop calls :meth:`OwnStreams.sweep`: for each own stream whose worker's registry hash has
expired, the entries nobody has read yet move to the shared stream (one Lua call, payload kept),
and the streams that still hold pending entries (read by the dead worker, never finished) are
returned so that the caller XAUTOCLAIMs them once their lease has passed.  An emptied stream is
deleted.  A draining worker moves its own unread entries itself (:meth:`OwnStreams.move_own`);
the gateway's ENQUEUE stops pushing to a worker whose state is not ``ready`` in the same atomic
step, so no entry can land in a stream after it was swept.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import redis.asyncio as aioredis

from common.keys import Keys
from common.scripts import Scripts

log = logging.getLogger("mgpu.worker.orphans")

_BATCH = 1000


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class OwnStreams:
    def __init__(self, client: aioredis.Redis, scripts: Scripts, keys: Keys, model: str, worker_id: str) -> None:
        self.r = client
        self.scripts = scripts
        self.keys = keys
        self.model = model
        self.id = worker_id
        self.own = keys.worker_stream(model, worker_id)
        self._next_look = 0.0  # monotonic time of the next look at the other workers
        self._pending: list[str] = []  # own streams of gone workers that held pending entries at the last look

    async def _move_all(self, wid: str, force: bool) -> tuple[int, int]:
        total = 0
        while True:
            out = await self.scripts.move_undelivered(self.model, wid, self.id, force=force, batch=_BATCH)
            if out is None:
                return -1, 0
            moved, left = out
            total += moved
            if moved < _BATCH:
                return total, left

    async def move_own(self) -> int:
        """Draining: hand the unread entries of this worker's own stream to the shared stream."""
        moved, _left = await self._move_all(self.id, force=True)
        if moved:
            log.info("moved own unread entries to the shared stream", extra={"worker": self.id, "count": moved})
        return max(moved, 0)

    async def sweep(self, every_s: float) -> list[str]:
        """Rescue the own streams of gone workers; returns those still holding pending entries.

        Called every ``every_s``, it looks only once in as many calls as there are other workers (at random):
        each look checks every other worker, so the fleet together makes about one look per ``every_s``
        and the work grows with the fleet, not with its square (16 idle workers used to make 480 EXISTS a
        second, 32 workers 1,984).  A stream whose worker died is rescued within about ``every_s`` on average
        still.  Streams found holding pending entries are returned at every call until they are empty."""
        now = time.monotonic()
        if now < self._next_look:
            return list(self._pending)
        ids = [_s(i) for i in await self.r.smembers(self.keys.worker_streams(self.model))]
        others = [i for i in ids if i != self.id]
        self._next_look = now + every_s * max(0, len(others) - 1) * random.uniform(0.5, 1.5)
        if not others:
            self._pending = []
            return []
        async with self.r.pipeline(transaction=False) as p:
            for wid in others:
                p.exists(self.keys.worker(wid))
            alive = await p.execute()
        pending: list[str] = []
        for wid, up in zip(others, alive):
            if up:
                continue
            moved, left = await self._move_all(wid, force=False)
            if moved > 0:
                log.warning("moved unread entries of gone worker %s to the shared stream", wid,
                            extra={"worker": self.id, "count": moved})
            if left > 0:
                pending.append(self.keys.worker_stream(self.model, wid))
        self._pending = pending
        return pending
