"""Files that expire (OpenAI's ``expires_after``; docs/batch.md): every gateway replica deletes, every
``file_sweep_interval_s``, the files whose ``expires_at`` has passed (``Keys.files_expiry``).  The API hides such a
file from its ``expires_at`` on (gateway/files_api.py), whether or not a sweep has run.

The input file of a batch that has not finished is kept past its expiry, until the batch ends: its feeder reads
the file again, a window at a time, until the last line is submitted.  The deletion script itself refuses such a
file (``Keys.file_batches``, set by the batch's creation in the transaction that checks the file is there), so a
batch created while a sweep runs keeps its input too; the sweep skips the inputs it knows of
(``Keys.batches_active``) only so that they do not fill its page.  Replicas may sweep at once: a file's deletion
is one script (``FileStore.delete``), so its bytes leave the store's total once."""

from __future__ import annotations

import asyncio
import logging
import time

import redis

from common.backoff import Backoff
from common.batchjob import BatchRecord
from common.filestore import FileInUse
from gateway.state import GatewayState

log = logging.getLogger("mgpu.gateway.files")

_PAGE = 256  # files looked at per sweep, beyond those kept for a batch


async def inputs_in_use(state: GatewayState) -> set[str]:
    """The input files of the batches not finished (``Keys.batches_active``)."""
    k = state.settings.keys
    active = await state.redis.smembers(k.batches_active)
    if not active:
        return set()
    raws = await state.redis.mget([k.batch(b.decode()) for b in active])
    return {BatchRecord.model_validate_json(raw).input_file_id for raw in raws if raw is not None}


async def sweep(state: GatewayState, now: float | None = None) -> tuple[int, bool]:
    """Delete the files expired by ``now`` except the inputs of running batches: how many this call deleted, and
    whether it found a full page and deleted from it (more may be due: sweep again at once)."""
    now = time.time() if now is None else now
    keep = await inputs_in_use(state)
    due = await state.files.expired(now, _PAGE + len(keep))
    deleted = 0
    for fid in due:
        if fid in keep:
            continue
        try:
            deleted += await state.files.delete(fid)
        except FileInUse:  # a batch created since ``keep`` was read: kept until it ends
            pass
    if deleted:
        state.metrics.files_expired.inc(deleted)
        log.info("deleted expired files", extra={"files": deleted})
    # a full page that deleted nothing (every file on it refused: marked by batches not among the active) waits
    # for the next interval rather than spinning
    return deleted, deleted > 0 and len(due) >= _PAGE + len(keep)


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
        except Exception:  # a record it cannot read, say: logged, and the sweeps go on
            log.exception("the expired files' sweep failed")
            await backoff.wait()
            continue
        if not full:
            await asyncio.sleep(state.settings.file_sweep_interval_s)
