"""Reading and changing a batch's record (:class:`common.batchjob.BatchRecord`) in Redis, atomically.

Every change is one optimistic transaction: ``WATCH`` the record (and, for a feeder, its lease), read it,
compute the new record, then ``MULTI`` / ``SET`` and whatever else must happen with it (an ``XADD``, the
progress hashes, the output lists) / ``EXEC``.  A concurrent change (the cancel route, another feeder) makes
``EXEC`` fail and the change is computed again from the new record.  A feeder's changes are *fenced*: the
lease must still hold its token when the transaction runs, so a feeder that lost its lease (paused past
``batch_lease_ms``, its Redis connection cut) writes nothing after another one took over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from common import errors
from common.batchjob import BatchRecord
from common.keys import Keys

Change = Callable[[BatchRecord], BatchRecord | None]  # the new record; None: no change
Also = Callable[[Any, BatchRecord], None]  # more commands queued in the same MULTI (the pipeline, the new record)


class LeaseLost(Exception):
    """This feeder's lease on the batch is gone (expired, or another feeder holds it)."""


async def load(r: aioredis.Redis, keys: Keys, batch_id: str) -> BatchRecord | None:
    raw = await r.get(keys.batch(batch_id))
    return None if raw is None else BatchRecord.model_validate_json(raw)


async def transact(r: aioredis.Redis, keys: Keys, batch_id: str, change: Change, *, also: Also | None = None,
                   token: str | None = None, tries: int = 50) -> BatchRecord | None:
    """Apply ``change`` to the batch's record atomically (see the module doc); the record as it is after (None:
    no such batch).  With ``token``, fenced by the batch's lease (LeaseLost if it does not hold it)."""
    key, lease = keys.batch(batch_id), keys.batch_lease(batch_id)
    for _ in range(tries):
        async with r.pipeline(transaction=True) as p:
            try:
                await p.watch(*([key, lease] if token is not None else [key]))
                raw = await p.get(key)
                if raw is None:
                    return None
                if token is not None and (held := await p.get(lease)) != token.encode():
                    raise LeaseLost(f"batch {batch_id}: lease held by {held!r}")
                rec = BatchRecord.model_validate_json(raw)
                new = change(rec.model_copy(deep=True))
                if new is None:
                    return rec
                p.multi()
                p.set(key, new.model_dump_json())
                if also is not None:
                    also(p, new)
                await p.execute()
                return new
            except redis.WatchError:
                continue
    raise errors.ServiceUnavailable(f"batch {batch_id} is changing too often; retry")


async def acquire(r: aioredis.Redis, keys: Keys, batch_id: str, token: str, lease_ms: int) -> bool:
    return bool(await r.set(keys.batch_lease(batch_id), token, nx=True, px=lease_ms))


async def renew(r: aioredis.Redis, keys: Keys, batch_id: str, token: str, lease_ms: int) -> bool:
    """Extend the lease if ``token`` still holds it (fenced like :func:`transact`)."""
    lease = keys.batch_lease(batch_id)
    async with r.pipeline(transaction=True) as p:
        try:
            await p.watch(lease)
            if await p.get(lease) != token.encode():
                return False
            p.multi()
            p.pexpire(lease, lease_ms)
            await p.execute()
            return True
        except redis.WatchError:
            return False


def now_s() -> int:
    return int(time.time())
