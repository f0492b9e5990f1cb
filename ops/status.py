"""``mgpu status``: a live terminal view of the workers and queues, read from Redis.

    mgpu status              refreshes every second (Ctrl+C to leave)
    mgpu status --once       one snapshot (requests/s measured over one interval)

Plain ANSI: the screen is cleared and redrawn; colours only on a terminal (or ``--color``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from common.batchjob import BatchRecord
from common.keys import Keys
from common.queues import ModelQueues, read_queues
from common.records import WorkerRecord
from common.redis_conn import async_client, redacted
from ops.rollout import RolloutState

CLEAR = "\x1b[H\x1b[2J"
ROLLOUT_SHOWN_S = 3600.0  # a finished rollout stays on the screen this long
_COLOURS = {"green": "32", "yellow": "33", "red": "31", "bold": "1", "dim": "2"}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class WorkerRow:
    id: str
    state: str
    gpu: str
    model: str
    version: str
    slots: int
    busy: int
    heartbeat_age_s: float
    served: int
    failed: int
    reclaimed: int
    starts: int
    revision: str = ""
    rate: float | None = None  # requests/s, from the served counter between two snapshots


@dataclass
class Snapshot:
    at: float
    workers: list[WorkerRow] = field(default_factory=list)
    queues: list[ModelQueues] = field(default_factory=list)
    rollout: RolloutState | None = None  # the current or last rollout
    batches: list[BatchRecord] = field(default_factory=list)  # the Batches API's batches not finished yet
    preempted: int = 0  # batch requests the workers handed back for interactive ones


async def take_snapshot(r: aioredis.Redis, keys: Keys) -> Snapshot:
    now = time.time()
    ids = sorted(_s(i) for i in await r.smembers(keys.workers))
    async with r.pipeline(transaction=False) as p:
        for wid in ids:
            p.hgetall(keys.worker(wid))
        p.hkeys(keys.models)
        p.hgetall(keys.worker_starts)
        p.get(keys.rollout)
        p.smembers(keys.batches_active)
        out = await p.execute()
    active = sorted(_s(b) for b in out.pop())
    rollout_raw = out.pop()
    starts = {_s(k): int(v) for k, v in out[-1].items()}
    snap = Snapshot(at=now)
    with contextlib.suppress(ValidationError):
        snap.rollout = None if rollout_raw is None else RolloutState.model_validate_json(rollout_raw)
    for wid, raw in zip(ids, out[:-2]):
        rec = WorkerRecord.from_hash(wid, raw)
        if rec is None:
            continue
        snap.workers.append(WorkerRow(
            id=wid, state=str(rec.state), gpu=rec.gpu or "-", model=rec.model, version=rec.version, slots=rec.slots,
            busy=rec.in_flight, heartbeat_age_s=max(0.0, now - rec.heartbeat), served=rec.served, failed=rec.failed,
            reclaimed=rec.reclaimed, starts=starts.get(wid, 0), revision=rec.revision))
        snap.preempted += rec.preempted
    models = sorted({_s(m) for m in out[-2]} | {w.model for w in snap.workers})
    snap.queues = await read_queues(r, keys, models, now=now)
    for raw in (await r.mget([keys.batch(b) for b in active]) if active else []):
        with contextlib.suppress(ValidationError, TypeError):
            snap.batches.append(BatchRecord.model_validate_json(raw))
    return snap


def with_rates(snap: Snapshot, prev: Snapshot | None) -> Snapshot:
    if prev is None:
        return snap
    before = {w.id: w.served for w in prev.workers}
    dt = snap.at - prev.at
    for w in snap.workers:
        if w.id in before and dt > 0:
            w.rate = max(0, w.served - before[w.id]) / dt
    return snap


def _age(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.1f}h"


def _table(headers: list[str], rows: list[list[str]], colours: list[list[str | None]], colour: bool) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def paint(text: str, c: str | None) -> str:
        return f"\x1b[{_COLOURS[c]}m{text}\x1b[0m" if colour and c else text

    lines = ["  ".join(paint(h.ljust(w), "bold") for h, w in zip(headers, widths)).rstrip()]
    for r, cs in zip(rows, colours):
        cells = [paint(v.rjust(w) if v[:1].isdigit() or v[:1] in "-." else v.ljust(w), c)
                 for v, w, c in zip(r, widths, cs)]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(snap: Snapshot, *, title: str = "", colour: bool = False, stale_s: float = 2.0) -> str:
    ready = sum(1 for w in snap.workers if w.state == "ready")
    out = [f"mgpu status  {title}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(snap.at))}".rstrip(), ""]
    out.append(f"WORKERS  {ready} ready / {len(snap.workers)} registered")
    rows, colours = [], []
    total_rate = 0.0
    for w in snap.workers:
        total_rate += w.rate or 0.0
        state_c = {"ready": "green", "draining": "yellow", "canary": "yellow"}.get(w.state, "red")
        hb_c = "red" if w.heartbeat_age_s > stale_s else None
        busy_c = "yellow" if w.slots and w.busy >= w.slots else None
        rows.append([w.id, w.state, w.gpu, w.model, w.version, f"{w.busy}/{w.slots}", _age(w.heartbeat_age_s),
                     "-" if w.rate is None else f"{w.rate:.1f}", str(w.served), str(w.failed), str(w.reclaimed),
                     str(max(0, w.starts - 1)), w.revision or "-"])
        colours.append([None, state_c, None, None, None, busy_c, hb_c, None, None,
                        "red" if w.failed else None, None, "yellow" if w.starts > 1 else None, None])
    out += _table(["WORKER", "STATE", "GPU", "MODEL", "VERSION", "SLOTS", "HEARTBEAT", "REQ/S", "SERVED",
                   "FAILED", "RECLAIMED", "RESTARTS", "REVISION"], rows, colours, colour)
    if any(w.rate is not None for w in snap.workers):
        out.append(f"  total {total_rate:.1f} req/s")
    ro = snap.rollout
    if ro is not None and (ro.active or snap.at - (ro.finished_at or 0) < ROLLOUT_SHOWN_S):
        updated = sum(p.phase == "updated" for p in ro.slots)
        busy = ", ".join(f"{p.slot} {p.phase}" for p in ro.slots if p.phase not in ("waiting", "updated"))
        line = f"ROLLOUT  {ro.id} {ro.kind} {ro.phase}"
        if ro.slots:
            line += (f" {ro.from_revision} -> {ro.to_revision}  {updated}/{len(ro.slots)} updated"
                     + (f"  ({busy})" if busy else ""))
        out += ["", line if not colour else f"\x1b[{_COLOURS['yellow' if ro.active else 'bold']}m{line}\x1b[0m"]
        if ro.reason:
            out.append(f"  reason: {ro.reason}")
    out += ["", "QUEUES"]
    rows, colours = [], []
    for mq in snap.queues:
        for q in mq.streams:
            rows.append([q.model, q.stream, str(q.length), str(q.lag), str(q.pending), str(q.consumers),
                         _age(q.oldest_waiting_age_s), str(mq.dead_letters) if q.kind == "requests" else "-"])
            colours.append([None, None, "yellow" if q.length else None, "yellow" if q.lag else None, None, None,
                            "yellow" if q.oldest_waiting_age_s > 5 else None,
                            "red" if mq.dead_letters and q.kind == "requests" else None])
    out += _table(["MODEL", "STREAM", "LENGTH", "LAG", "PENDING", "CONSUMERS", "OLDEST WAIT", "DEAD LETTERS"],
                  rows, colours, colour)
    if snap.batches or snap.preempted:
        out += ["", f"BATCHES  {len(snap.batches)} running; {snap.preempted} batch requests preempted by "
                    "interactive ones"]
        rows, colours = [], []
        for b in snap.batches:
            left = b.expires_at - snap.at
            rows.append([b.id, str(b.status), f"{b.completed + b.failed}/{b.total}", str(b.failed),
                         _age(max(0.0, left))])
            colours.append([None, None, None, "red" if b.failed else None, "yellow" if left < 3600 else None])
        out += _table(["BATCH", "STATUS", "DONE", "FAILED", "EXPIRES IN"], rows, colours, colour)
    return "\n".join(out) + "\n"


async def run_status(redis_url: str, keys: Keys, *, once: bool = False, interval: float = 1.0,
                     colour: bool | None = None) -> int:
    colour = sys.stdout.isatty() if colour is None else colour
    r = async_client(redis_url, socket_timeout=5, socket_connect_timeout=2)
    title = f"namespace={keys.ns}  redis={redacted(redis_url)}"
    try:
        prev = await take_snapshot(r, keys)
        if once:
            await asyncio.sleep(interval)  # the window over which requests/s is measured
            sys.stdout.write(render(with_rates(await take_snapshot(r, keys), prev), title=title, colour=colour))
            return 0
        sys.stdout.write("\x1b[?25l")  # hide the cursor
        while True:
            sys.stdout.write(CLEAR + render(prev, title=title, colour=colour))
            sys.stdout.flush()
            await asyncio.sleep(interval)
            prev = with_rates(await take_snapshot(r, keys), prev)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0
    finally:
        if not once:
            sys.stdout.write("\x1b[?25h\n")
            sys.stdout.flush()
        await r.aclose()
