"""The gateway's view of the worker registry, refreshed in the background (never per request)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from common.keys import Keys

log = logging.getLogger("mgpu.gateway.registry")


@dataclass
class WorkerInfo:
    id: str
    model: str
    state: str
    slots: int
    in_flight: int
    heartbeat: float
    fields: dict[str, str]

    @property
    def weight(self) -> float:
        """Share for the weighted strategy (the worker's ``weight`` setting; default: slots)."""
        try:
            return float(self.fields.get("weight") or self.slots)
        except ValueError:
            return float(self.slots)

    @property
    def queued(self) -> int:
        """Undelivered entries in the worker's own stream, as of its last heartbeat."""
        v = self.fields.get("queued", "0")
        return int(v) if v.isdigit() else 0

    @property
    def heartbeat_age_s(self) -> float:
        return max(0.0, time.time() - self.heartbeat)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.fields)
        d.update(slots=self.slots, in_flight=self.in_flight, heartbeat_age_s=round(self.heartbeat_age_s, 3))
        return d


@dataclass
class ModelInfo:
    name: str
    max_model_len: int = 0
    tokenizer: str = ""
    engine: str = ""


@dataclass
class RegistryView:
    keys: Keys
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    refreshed_at: float = 0.0
    redis_ok: bool = False
    control: dict[str, str] = field(default_factory=dict)  # run-time settings (Keys.control)
    memory_high_water: float = 0.9  # used_memory / maxmemory past which new work is refused
    memory_pressure: str | None = None  # why new work is refused now (Redis near its maxmemory), or None

    def live_workers(self, model: str | None = None) -> list[WorkerInfo]:
        return [w for w in self.workers.values()
                if w.state == "ready" and (model is None or w.model == model)]

    def live_models(self) -> list[str]:
        return sorted({w.model for w in self.live_workers()})

    async def refresh(self, r: aioredis.Redis) -> None:
        ids = [i.decode() if isinstance(i, bytes) else i for i in await r.smembers(self.keys.workers)]
        async with r.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(self.keys.worker(i))
            p.hgetall(self.keys.models)
            p.hgetall(self.keys.control)
            p.info("memory")
            out = await p.execute()
        self.memory_pressure = self._pressure(out.pop())
        control_raw = out.pop()
        workers: dict[str, WorkerInfo] = {}
        gone = []
        for wid, raw in zip(ids, out[:-1]):
            if not raw:
                gone.append(wid)
                continue
            f = {k.decode(): v.decode() for k, v in raw.items()}
            workers[wid] = WorkerInfo(id=wid, model=f.get("model", ""), state=f.get("state", "?"),
                                      slots=int(f.get("slots", 0) or 0), in_flight=int(f.get("in_flight", 0) or 0),
                                      heartbeat=float(f.get("heartbeat", 0) or 0), fields=f)
        if gone:  # heartbeat key expired: the worker is gone
            await r.srem(self.keys.workers, *gone)
        models = {}
        for name_b, info_b in out[-1].items():
            name = name_b.decode()
            try:
                info = json.loads(info_b)
            except ValueError:
                info = {}
            models[name] = ModelInfo(name=name, max_model_len=int(info.get("max_model_len", 0)),
                                     tokenizer=str(info.get("tokenizer", "")), engine=str(info.get("engine", "")))
        self.workers, self.models = workers, models
        self.control = {k.decode(): v.decode() for k, v in control_raw.items()}
        self.refreshed_at = time.monotonic()
        self.redis_ok = True

    def _pressure(self, info: dict[str, Any]) -> str | None:
        used, limit = int(info.get("used_memory", 0) or 0), int(info.get("maxmemory", 0) or 0)
        if limit and used >= self.memory_high_water * limit:
            return (f"the queue (Redis) is near its memory limit ({used / limit:.0%} of maxmemory); new work is "
                    "refused until it drains")
        return None

    closed: bool = False  # set at shutdown: the loop ends even if a cancellation got lost

    async def run(self, r: aioredis.Redis, interval_s: float) -> None:
        while not self.closed:
            try:
                await self.refresh(r)
            except (redis.RedisError, OSError) as exc:
                if self.redis_ok:
                    log.warning("registry refresh failed: %s", exc)
                self.redis_ok = False
            await asyncio.sleep(interval_s)
