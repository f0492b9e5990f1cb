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

    async def sweep(self) -> list[str]:
        """Rescue the own streams of gone workers; returns those still holding pending entries."""
        ids = [_s(i) for i in await self.r.smembers(self.keys.worker_streams(self.model))]
        others = [i for i in ids if i != self.id]
        if not others:
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
        return pending
