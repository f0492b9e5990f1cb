"""Files that expire (OpenAI's ``expires_after``; docs/batch.md): every gateway replica deletes, every
``file_sweep_interval_s``, the files whose ``expires_at`` has passed (``Keys.files_expiry``).  The API hides such a
file from its ``expires_at`` on (gateway/files_api.py), whether or not a sweep has run.

The input file of a batch that has not finished is kept past its expiry, until the batch ends: its feeder reads
the file again, a window at a time, until the last line is submitted.  The deletion script refuses such a file
(``Keys.file_batches``, marked by the batch's creation in the transaction that checks the file is there), and the
sweep then looks at it again an interval later (its place in ``Keys.files_expiry`` moves on), so a page of such
files never holds up the others.  Replicas may sweep at once: a file's deletion is one script
(``FileStore.delete``), so its bytes leave the store's total once."""

from __future__ import annotations

import asyncio
import logging
import time

import redis

from common.backoff import Backoff
from common.filestore import FileInUse
from gateway.state import GatewayState

log = logging.getLogger("mgpu.gateway.files")

_PAGE = 256  # files looked at per sweep


async def sweep(state: GatewayState, now: float | None = None) -> tuple[int, bool]:
    """Delete the files due by ``now`` (a running batch's input: looked at again an interval later); how many this
    call deleted, and whether it found a full page (more may be due: sweep again at once)."""
    now = time.time() if now is None else now
    due = await state.files.expired(now, _PAGE)
    deleted = 0
    for fid in due:
        try:
            deleted += await state.files.delete(fid)
        except FileInUse:
            await state.files.postpone(fid, now + state.settings.file_sweep_interval_s)
    if deleted:
        state.metrics.files_expired.inc(deleted)
        log.info("deleted expired files", extra={"files": deleted})
    return deleted, len(due) >= _PAGE


async def run(state: GatewayState, closed: list[bool]) -> None:
    """The lifespan's task: a sweep every ``file_sweep_interval_s`` (after a full page, the next one at once)."""
    backoff = Backoff(0.5, 10.0)
    while not closed[0]:
        try:
            _, full = await sweep(state)
            backoff.reset()
        except (redis.RedisError, OSError) as exc:
            log.warning("the expired files' sweep failed: %r", exc)
            await backoff.wait()
            continue
        except Exception:  # anything unexpected: logged, and the sweeps go on
            log.exception("the expired files' sweep failed")
            await backoff.wait()
            continue
        if not full:
            await asyncio.sleep(state.settings.file_sweep_interval_s)
