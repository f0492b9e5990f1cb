"""What the gateway's lifespan owns and hands to every request: settings, Redis, the reply router,
the registry view, metrics, the queue's scripts, the balancer and the prompt counter."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis

from common.filestore import RedisFileStore
from common.schemas import IdempotencyRecord
from common.scripts import Limits, Scripts
from common.settings import GatewaySettings
from gateway.auth import KeyCache
from gateway.metrics import GatewayMetrics
from gateway.registry import RegistryView
from gateway.replies import ReplyRouter
from gateway.routing import Balancer
from gateway.tokens import PromptCounter


@dataclass
class GatewayState:
    settings: GatewaySettings
    redis: aioredis.Redis
    router: ReplyRouter
    registry: RegistryView
    metrics: GatewayMetrics
    scripts: Scripts
    balancer: Balancer
    api_keys: KeyCache
    prompts: PromptCounter = field(default_factory=PromptCounter)
    loop_tick: float = field(default_factory=time.monotonic)  # the event loop's last tick (liveness)

    @functools.cached_property
    def limits(self) -> Limits:
        """The queue limits every ENQUEUE passes (from the settings, which do not change while it runs)."""
        s = self.settings
        return Limits(s.max_queue_len, s.max_queue_bytes, s.max_queue_bytes_total, fair=s.fair_lanes,
                      key_share=max(1, int(s.max_queue_len * s.max_key_share)) if s.max_key_share else 0)

    @functools.cached_property
    def files(self) -> RedisFileStore:
        """Where files are kept (the Files and Batches APIs): Redis, shared by every replica."""
        s = self.settings
        return RedisFileStore(self.redis, s.keys, chunk_bytes=s.file_chunk_bytes,
                              max_total_bytes=s.file_store_max_bytes)

    @property
    def ready(self) -> bool:
        return self.registry.redis_ok and self.router.healthy

    @property
    def loop_lag_s(self) -> float:
        return max(0.0, time.monotonic() - self.loop_tick)

    def model_label(self, model: str | None) -> str:
        """A model as a metric label: only models the fleet serves or served (bounded), else ``unknown``."""
        return model if model is not None and model in self.registry.models else "unknown"

    async def forget_idempotency(self, idem_key: str | None, request_id: str) -> None:
        """Drop an Idempotency-Key's record if it still names ``request_id`` (a request that was not accepted)."""
        if idem_key is None:
            return
        with contextlib.suppress(redis.RedisError, OSError, ValueError):
            raw = await self.redis.get(idem_key)
            if raw is not None and IdempotencyRecord.model_validate_json(raw).request_id == request_id:
                await self.redis.delete(idem_key)

    async def cancel(self, request_id: str) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            await self.redis.xadd(self.settings.keys.cancels, {"r": request_id}, maxlen=10_000, approximate=True)
