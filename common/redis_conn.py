"""Redis connections: one place that builds pools, so every part uses the same timeouts."""

from __future__ import annotations

import redis.asyncio as aioredis


def make_pool(url: str, *, max_connections: int = 32, block_ms: int = 0,
              name: str | None = None) -> aioredis.BlockingConnectionPool:
    """A bounded pool; callers beyond ``max_connections`` wait for a free connection.

    ``socket_timeout`` stays above every blocking command's BLOCK time (redis-py needs that).
    """
    return aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=max(5.0, block_ms / 1000.0 + 5.0),
        health_check_interval=0,
        retry_on_timeout=False,
        client_name=name,
    )


def make_client(url: str, *, max_connections: int = 32, block_ms: int = 0, name: str | None = None) -> aioredis.Redis:
    return aioredis.Redis(connection_pool=make_pool(url, max_connections=max_connections, block_ms=block_ms,
                                                    name=name))
