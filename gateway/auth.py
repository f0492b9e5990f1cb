"""Who is calling: API keys (``Authorization: Bearer <key>``) when ``auth`` is ``keys``, nobody in particular
when it is ``off``; what a caller may do (models, the admin endpoints); the rate-limit headers it gets.

A key's record is read from Redis and kept for ``key_cache_s`` (half a second by default): a revoked key is
refused at once by the ENQUEUE script (it reads the record in the same atomic step that admits the request),
and by every other endpoint of every replica within that time.  The secret is checked by comparing SHA-256
digests in constant time (:meth:`common.apikeys.ApiKey.verify`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from starlette.requests import Request

from common import errors
from common.apikeys import ApiKey, digest, key_id
from common.keys import Keys
from common.schemas import ANONYMOUS
from common.scripts import KeyUsage


@dataclass(frozen=True)
class Caller:
    """The caller of one request: its scope (its key's id; ``ANONYMOUS`` with auth off) and its key."""

    scope: str
    key: ApiKey | None = None

    @property
    def name(self) -> str:
        """For metric labels and logs: the key's name, never its secret."""
        return self.key.name if self.key is not None else ANONYMOUS

    def check_model(self, model: str) -> None:
        if self.key is not None and not self.key.allows(model):
            raise errors.Forbidden(f"this API key may not use the model '{model}'", param="model")

    def check_admin(self) -> None:
        if self.key is not None and not self.key.admin:
            raise errors.Forbidden("this endpoint needs an admin API key")


ANONYMOUS_CALLER = Caller(ANONYMOUS)


@dataclass
class KeyCache:
    """API key records, each as read at most ``ttl_s`` ago (unknown ids too)."""

    redis: aioredis.Redis
    keys: Keys
    ttl_s: float = 0.5
    _seen: dict[str, tuple[float, ApiKey | None]] = field(default_factory=dict)

    async def get(self, kid: str) -> ApiKey | None:
        now = time.monotonic()
        hit = self._seen.get(kid)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        rec = ApiKey.from_hash(await self.redis.hgetall(self.keys.api_key(kid)))
        if len(self._seen) > 100_000:  # a flood of made-up ids must not grow it without bound
            self._seen.clear()
        self._seen[kid] = (now, rec)
        return rec


async def authenticate(request: Request, mode: str, cache: KeyCache, retry_after: float) -> Caller:
    """The request's caller; Unauthorized (401) for a missing, malformed, wrong, revoked or expired key."""
    if mode == "off":
        return ANONYMOUS_CALLER
    header = request.headers.get("authorization")
    if not header:
        raise errors.Unauthorized("you must send an API key: Authorization: Bearer <key>")
    scheme, _, secret = header.strip().partition(" ")
    secret = secret.strip()
    kid = key_id(secret) if scheme.lower() == "bearer" and secret else None
    if kid is None:
        raise errors.Unauthorized("malformed Authorization header: it must be 'Bearer <key>'")
    with errors.redis_unavailable("could not check the API key", retry_after=retry_after):
        rec = await cache.get(kid)
    if rec is None or not rec.verify(secret):
        raise errors.Unauthorized("incorrect API key provided")
    if why := rec.why_not_usable():
        raise errors.Unauthorized(why)
    return Caller(kid, rec)


async def bootstrap_key(r: aioredis.Redis, keys: Keys, secret: str) -> None:
    """Register ``secret`` as the admin key 'bootstrap' (a deployment's first key, from its environment); a
    previous bootstrap key is revoked (the variable was changed to rotate it)."""
    kid = key_id(secret)
    if kid is None:
        raise errors.InvalidRequest("bootstrap_api_key: at least 20 printable characters, no spaces")
    rec = ApiKey(id=kid, name="bootstrap", sha256=digest(secret), admin=True, created=time.time())
    old = await r.hget(keys.api_key_names, "bootstrap")
    async with r.pipeline(transaction=True) as p:
        if old is not None and old.decode() != kid:  # the environment's key changed: the old one stops working
            p.hset(keys.api_key(old.decode()), "revoked_at", str(time.time()))
        p.delete(keys.api_key(kid))
        p.hset(keys.api_key(kid), mapping=rec.to_hash())
        p.hset(keys.api_key_names, "bootstrap", kid)
        await p.execute()


def rate_headers(key: ApiKey | None, usage: KeyUsage | None) -> dict[str, str]:
    """OpenAI's rate-limit headers for a key with limits, from its minute after this request."""
    if key is None or usage is None:
        return {}
    out = {}
    for name, limit, used in (("requests", key.rpm, usage.requests), ("tokens", key.tpm, usage.tokens)):
        if limit > 0:
            out[f"x-ratelimit-limit-{name}"] = str(limit)
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, limit - used))
            out[f"x-ratelimit-reset-{name}"] = f"{usage.reset_s}s"
    return out
