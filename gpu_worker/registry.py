"""This worker in the fleet's registry: its record (:class:`common.records.WorkerRecord`, the hash
``Keys.worker``), the sets that list it, and the model facts it publishes once ready.

The record is built from the worker's fixed facts and its :class:`gpu_worker.stats.WorkerStats`;
the heartbeat (:mod:`gpu_worker.liveness`) rewrites it with its TTL twice a second, the lifecycle
(:mod:`gpu_worker.worker`) registers, publishes and deregisters.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from common.records import ModelFacts, WorkerRecord, WorkerState
from common.settings import WorkerSettings
from gpu_worker.serving.base import OpenAIServer
from gpu_worker.stats import WorkerStats


class Registry:
    def __init__(self, client: aioredis.Redis, settings: WorkerSettings, *, worker_id: str, server: OpenAIServer,
                 stats: WorkerStats, gpu_name: str, version: str) -> None:
        self.r = client
        self.s = settings
        self.keys = settings.keys
        self.id = worker_id
        self.model = settings.model
        self.server = server
        self.stats = stats
        self.gpu_name = gpu_name
        self.version = version
        self.revision = settings.effective_revision
        self.metrics_port = 0  # set once the metrics server listens
        self.key = self.keys.worker(worker_id)
        # Redis Cluster: a copy of the state on the model's slot, for its scripts (Keys.worker_live); else None
        live = self.keys.worker_live(self.model, worker_id)
        self.live = live if live != self.key else None
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._metrics_host = settings.metrics_host if settings.metrics_host not in ("", "0.0.0.0", "::") \
            else self._host

    def record(self) -> WorkerRecord:
        """This worker's registry record, as of now."""
        st, engine = self.stats, self.server
        return WorkerRecord(
            id=self.id, host=self._host, pid=self._pid, gpu="" if self.s.gpu is None else str(self.s.gpu),
            gpu_name=self.gpu_name, model=self.model, engine=engine.name, version=self.version,
            revision=self.revision, slots=engine.slots, in_flight=st.busy_slots, state=st.state,
            heartbeat=round(time.time(), 3), max_model_len=engine.max_model_len, served=st.served,
            metrics_port=self.metrics_port, failed=st.failed, metrics_host=self._metrics_host,
            cancelled=st.cancelled, skipped=st.skipped, reclaimed=st.reclaimed, fenced=st.fenced,
            dead_lettered=st.dead_lettered, engine_aborts=engine.aborts, preempted=st.preempted,
            weight=self.s.weight or engine.slots, queued=st.own_queued,
            models=",".join(c.id for c in engine.models()) if st.state != WorkerState.STARTING else "")

    def queue_presence(self, p: Any) -> None:
        """Queue on pipeline ``p`` (sync or asyncio) the writes that keep this worker listed: the
        record with its TTL, and its place in the worker set and in the model's own-stream set."""
        record = self.record()
        p.hset(self.key, mapping=record.to_hash())
        p.pexpire(self.key, int(self.s.worker_ttl_s * 1000))
        if self.live is not None:
            p.hset(self.live, "state", record.state)
            p.pexpire(self.live, int(self.s.worker_ttl_s * 1000))
        p.sadd(self.keys.workers, self.id)
        p.sadd(self.keys.worker_streams(self.model), self.id)

    async def register(self) -> None:
        async with self.r.pipeline(transaction=self.live is None) as p:  # a cluster: its keys span two slots
            self.queue_presence(p)
            p.hincrby(self.keys.worker_starts, self.id, 1)
            await p.execute()

    async def publish_ready(self) -> None:
        """Publish the facts of what the server serves (the gateway checks prompt lengths and endpoints with
        them, and lists them in /v1/models) and state ``ready``."""
        server = self.server
        facts = {c.id: ModelFacts(max_model_len=c.max_model_len, engine=server.name, tokenizer=c.tokenizer,
                                  root=c.root, parent=c.parent, kinds=list(c.kinds), owned_by=c.owned_by,
                                  created=int(time.time())).model_dump_json() for c in server.models()}
        with contextlib.suppress(redis.RedisError, OSError):
            async with self.r.pipeline(transaction=self.live is None) as p:
                if facts:
                    p.hset(self.keys.models, mapping=facts)
                p.hset(self.key, mapping={"state": WorkerState.READY.value, "models": ",".join(facts)})
                if self.live is not None:
                    p.hset(self.live, "state", WorkerState.READY.value)
                await p.execute()

    async def publish_state(self, state: WorkerState) -> None:
        await self.r.hset(self.key, "state", state.value)
        if self.live is not None:
            await self.r.hset(self.live, "state", state.value)

    async def deregister(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            async with self.r.pipeline(transaction=self.live is None) as p:
                p.delete(self.key)
                p.srem(self.keys.workers, self.id)
                if self.live is not None:
                    p.delete(self.live)
                await p.execute()
