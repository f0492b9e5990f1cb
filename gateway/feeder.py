"""The batch feeder: every gateway replica looks for batches that no feeder drives (``Keys.batches_active``), and
takes each one's lease (``SET NX PX``, a token of its own) before it drives it, so one feeder at a time runs a
batch.  While it holds the lease it renews it (fenced by its token) between steps (:mod:`gateway.batch_run`).  A
gateway that dies, hangs or loses Redis stops renewing; ``batch_lease_ms`` later another replica (or the restarted
one) takes the lease and resumes from the batch's progress in Redis.  Every write a feeder makes to a batch is
fenced by the token (:mod:`gateway.batch_records`): one that lost its lease writes nothing more."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import redis

from common import errors
from common.backoff import Backoff
from gateway import batch_records
from gateway.batch_records import LeaseLost
from gateway.batch_run import Run
from gateway.state import GatewayState

log = logging.getLogger("mgpu.gateway.feeder")


class Feeder:
    """This gateway's feeders: one task per batch whose lease it holds."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.closed = False

    def token(self) -> str:
        """A lease token: this gateway's id (for operators and tests), and a part no other holder has."""
        return f"{self.state.settings.gateway_id}:{uuid.uuid4().hex}"

    async def run(self) -> None:
        """Look for batches without a feeder, every ``batch_poll_s`` (the lifespan's task)."""
        s = self.state.settings
        backoff = Backoff(0.5, 5.0)
        while not self.closed:
            try:
                for raw in await self.state.redis.smembers(s.keys.batches_active):
                    bid = raw.decode()
                    if bid in self.tasks:
                        continue
                    token = self.token()
                    if await batch_records.acquire(self.state.redis, s.keys, bid, token, s.batch_lease_ms):
                        log.info("feeding batch", extra={"batch": bid})
                        self.tasks[bid] = asyncio.create_task(self.drive(bid, token), name=f"batch:{bid}")
                backoff.reset()
            except (redis.RedisError, OSError) as exc:
                log.warning("looking for batches failed: %r", exc)
                await backoff.wait()
            await asyncio.sleep(s.batch_poll_s)

    async def drive(self, bid: str, token: str) -> None:
        """Run one batch's steps while this gateway holds its lease."""
        s = self.state.settings
        r, keys = self.state.redis, s.keys

        async def renew() -> bool:
            return await batch_records.renew(r, keys, bid, token, s.batch_lease_ms)

        run = Run(self.state, bid, token, renew)
        backoff = Backoff(s.batch_poll_s, 5.0)
        try:
            while not self.closed:
                try:
                    if not await renew():
                        log.warning("lost the lease of batch %s", bid)
                        return
                    rec = await batch_records.load(r, keys, bid)
                    if rec is None or await run.step(rec):
                        if rec is None or rec.final:
                            await r.srem(keys.batches_active, bid)
                        after = await batch_records.load(r, keys, bid)
                        if after is not None and after.final:
                            self.state.metrics.batches_finished.labels(str(after.status)).inc()
                        return
                    self.state.metrics.batch_progress(bid, {
                        "total": rec.total, "completed": rec.completed, "failed": rec.failed,
                        "outstanding": await r.hlen(keys.batch_outstanding(bid))},
                        expires_in_s=max(0.0, rec.expires_at - time.time()))
                    backoff.reset()
                    if not run.progressed:  # nothing answered and nothing to submit: look again later
                        await asyncio.sleep(s.batch_poll_s)
                    else:
                        await asyncio.sleep(0)
                except LeaseLost as exc:
                    log.warning("lost the lease of batch %s: %s", bid, exc)
                    return
                except (redis.RedisError, OSError, errors.MgpuError) as exc:
                    log.warning("batch %s: step failed, retrying: %r", bid, exc)
                    await backoff.wait()
                except Exception:
                    log.exception("batch %s: unexpected error in a step; retrying", bid)
                    await backoff.wait()
        finally:
            self.tasks.pop(bid, None)
            self.state.metrics.batch_progress(bid, None)

    async def close(self) -> None:
        """Stop every feeder (their leases expire and another replica takes the batches over)."""
        self.closed = True
        for t in list(self.tasks.values()):
            t.cancel()
        if self.tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait(list(self.tasks.values()), timeout=2.0)
