"""The gateway's view of the worker registry, refreshed in the background (never per request):
the workers (:class:`common.records.WorkerRecord`), the facts of the models they serve, the
run-time control hash, and whether Redis is near its memory limit."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from common.keys import Keys
from common.records import ModelFacts, WorkerRecord

log = logging.getLogger("mgpu.gateway.registry")


@dataclass
class RegistryView:
    keys: Keys
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    models: dict[str, ModelFacts] = field(default_factory=dict)
    refreshed_at: float = 0.0
    redis_ok: bool = False
    control: dict[str, str] = field(default_factory=dict)  # run-time settings (Keys.control)
    memory_high_water: float = 0.9  # used_memory / maxmemory past which new work is refused
    memory_pressure: str | None = None  # why new work is refused now (Redis near its maxmemory), or None
    closed: bool = False  # set at shutdown: the loop ends even if a cancellation got lost

    def live_workers(self, model: str | None = None) -> list[WorkerRecord]:
        """Ready workers; of ``model``: those that answer to that name (their model, or an adapter of theirs)."""
        return [w for w in self.workers.values() if w.ready and (model is None or model in w.names)]

    def live_models(self) -> list[str]:
        """Every name a ready worker answers to: models and adapters."""
        return sorted({name for w in self.live_workers() for name in w.names})

    async def refresh(self, r: aioredis.Redis) -> None:
        ids = [i.decode() if isinstance(i, bytes) else i for i in await r.smembers(self.keys.workers)]
        async with r.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(self.keys.worker(i))
            p.hgetall(self.keys.models)
            p.hgetall(self.keys.control)
            if not self.keys.cluster:
                p.info("memory")
            out = await p.execute()
        memory = out.pop() if not self.keys.cluster else await _fullest_primary(r)
        control_raw, models_raw = out.pop(), out.pop()
        workers: dict[str, WorkerRecord] = {}
        gone = []
        for wid, raw in zip(ids, out):
            rec = WorkerRecord.from_hash(wid, raw)
            if rec is None:
                gone.append(wid)
            else:
                workers[wid] = rec
        if gone:  # heartbeat key expired: the worker is gone
            await r.srem(self.keys.workers, *gone)
        self.workers = workers
        self.models = {(k.decode() if isinstance(k, bytes) else k): ModelFacts.parse(v) for k, v in models_raw.items()}
        self.control = {k.decode(): v.decode() for k, v in control_raw.items()}
        self.memory_pressure = self._pressure(memory)
        self.refreshed_at = time.monotonic()
        self.redis_ok = True

    def _pressure(self, info: dict[str, Any]) -> str | None:
        used, limit = int(info.get("used_memory", 0) or 0), int(info.get("maxmemory", 0) or 0)
        if limit and used >= self.memory_high_water * limit:
            return (f"the queue (Redis) is near its memory limit ({used / limit:.0%} of maxmemory); new work is "
                    "refused until it drains")
        return None

    async def run(self, r: aioredis.Redis, interval_s: float) -> None:
        """Refresh every ``interval_s``, also while Redis is away (so that /ready recovers at once)."""
        while not self.closed:
            try:
                await self.refresh(r)
            except (redis.RedisError, OSError) as exc:
                if self.redis_ok:
                    log.warning("registry refresh failed: %s", exc)
                self.redis_ok = False
            await asyncio.sleep(interval_s)


async def _fullest_primary(r: Any) -> dict[str, Any]:
    """A Redis Cluster's INFO memory of the primary nearest its maxmemory (any full shard refuses writes)."""
    per_node = await r.info("memory", target_nodes=r.PRIMARIES)
    infos = list(per_node.values()) if per_node and isinstance(next(iter(per_node.values())), dict) else [per_node]

    def fill(info: dict[str, Any]) -> float:
        limit = int(info.get("maxmemory", 0) or 0)
        return int(info.get("used_memory", 0) or 0) / limit if limit else 0.0

    return max(infos, key=fill)
