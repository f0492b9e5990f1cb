"""Redis connections: one place that builds pools and clients, so every part uses the same timeouts and
understands the same URLs: ``redis://``, ``rediss://`` (TLS), ``unix://``, ``redis+sentinel://`` (the
primary that Redis Sentinel names, found again after a failover) and ``redis+cluster://`` (a Redis Cluster:
redis-py's cluster client, which routes each command and script to its slot's primary and follows MOVED;
docs/deployment.md)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.sentinel as aiosentinel
import redis.cluster
import redis.sentinel

from common.redis_url import CLUSTER_SCHEME, SENTINEL_SCHEME, ClusterUrl, SentinelUrl

# Errors that pass: Redis unreachable, restarting or failing over; on a cluster also a slot being moved (TRYAGAIN,
# ASK), a shard without a primary (CLUSTERDOWN), or no node reachable at all (RedisClusterException).
TRANSIENT: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
    redis.exceptions.RedisClusterException, OSError)

# A cluster client has no blocking pool: a command past a node's connection limit fails at once.  Each node's
# limit is this many times the pool size asked for, so that it is never what a burst meets.
CLUSTER_CONNECTIONS_FACTOR = 8


class BlockingSentinelPool(aiosentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The primary's connections, found through Sentinel, in a bounded pool that makes callers wait for a free
    connection (as :func:`make_pool`) instead of failing past ``max_connections``."""


def make_pool(url: str, *, max_connections: int = 32, block_ms: int = 0,
              name: str | None = None) -> aioredis.BlockingConnectionPool:
    """A bounded pool; callers beyond ``max_connections`` wait for a free connection.

    ``socket_timeout`` stays above every blocking command's BLOCK time (redis-py needs that).  With a
    Sentinel URL every new connection asks the sentinels for the primary; a connection to a primary that
    became a replica fails on its first write (READONLY) and the next one finds the new primary.
    """
    kw: dict[str, Any] = dict(max_connections=max_connections, timeout=5, socket_connect_timeout=2,
                              socket_timeout=max(5.0, block_ms / 1000.0 + 5.0), health_check_interval=0,
                              retry_on_timeout=False, client_name=name)
    if url.startswith(SENTINEL_SCHEME):
        su = SentinelUrl.parse(url)
        manager = aiosentinel.Sentinel(su.sentinels, sentinel_kwargs=su.sentinel_kwargs(2.0))
        return BlockingSentinelPool(su.service, manager, is_master=True, **su.connection_kwargs(), **kw)
    return aioredis.BlockingConnectionPool.from_url(url, **kw)


def _master_for(sentinel: Any, url: str, kwargs: dict[str, Any]) -> Any:
    """A client of the primary that the sentinels of a ``redis+sentinel://`` URL name (``sentinel``: redis-py's
    blocking or asyncio Sentinel class)."""
    su = SentinelUrl.parse(url)
    timeout = float(kwargs.get("socket_connect_timeout") or 2.0)
    manager = sentinel(su.sentinels, sentinel_kwargs=su.sentinel_kwargs(timeout))
    return manager.master_for(su.service, **su.connection_kwargs(), **kwargs)


def is_cluster(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def _cluster_kwargs(url: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    cu = ClusterUrl.parse(url)
    kw = {k: v for k, v in kwargs.items() if k not in ("health_check_interval", "timeout", "retry_on_timeout")}
    return {"username": cu.username, "password": cu.password, "require_full_coverage": True, **kw}


def _cluster_async(url: str, kwargs: dict[str, Any]) -> aioredis.Redis:
    nodes = [aiocluster.ClusterNode(h, p) for h, p in ClusterUrl.parse(url).nodes]
    return aiocluster.RedisCluster(startup_nodes=nodes, **_cluster_kwargs(url, kwargs))  # type: ignore[return-value]


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking client (control commands, the supervisor, health checks) for any URL mgpu accepts."""
    if is_cluster(url):
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in ClusterUrl.parse(url).nodes]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **_cluster_kwargs(url, kwargs))  # type: ignore[return-value]
    if url.startswith(SENTINEL_SCHEME):
        return _master_for(redis.sentinel.Sentinel, url, kwargs)  # type: ignore[no-any-return]
    return redis.Redis.from_url(url, **kwargs)


def async_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """An unpooled-style asyncio client (one-off tools) for any URL mgpu accepts."""
    if is_cluster(url):
        return _cluster_async(url, kwargs)
    if url.startswith(SENTINEL_SCHEME):
        return _master_for(aiosentinel.Sentinel, url, kwargs)  # type: ignore[no-any-return]
    return aioredis.Redis.from_url(url, **kwargs)


def make_client(url: str, *, max_connections: int = 32, block_ms: int = 0, name: str | None = None) -> aioredis.Redis:
    """The asyncio client of a long-running part (gateway, worker): pooled, with :func:`make_pool`'s timeouts."""
    if is_cluster(url):
        return _cluster_async(url, dict(max_connections=max_connections * CLUSTER_CONNECTIONS_FACTOR,
                                        socket_connect_timeout=2, socket_timeout=max(5.0, block_ms / 1000.0 + 5.0),
                                        client_name=name))
    return aioredis.Redis(connection_pool=make_pool(url, max_connections=max_connections, block_ms=block_ms,
                                                    name=name))


def redacted(url: str) -> str:
    """A Redis URL for a log line: its password replaced by ``***``."""
    if url.startswith((SENTINEL_SCHEME, CLUSTER_SCHEME)):
        parts = urlsplit(url)
        auth, at, hosts = parts.netloc.rpartition("@")
        netloc = (auth.partition(":")[0] + (":***" if ":" in auth else "") + at + hosts) if at else hosts
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_credentials(dsn: str) -> None:
    """Fail at start-up, naming the setting, when Redis refuses this process's password or ACL user, or its TLS
    files or handshake are wrong.  Redis being down is no error here (every part rides out an outage)."""
    import ssl

    import redis

    from common.settings import SettingsError

    if dsn.startswith(SENTINEL_SCHEME):  # a sentinel that refuses its password looks like "no primary" later
        su = SentinelUrl.parse(dsn)
        for host, port in su.sentinels:
            s = redis.Redis(host=host, port=port, **su.sentinel_kwargs(2.0))
            try:
                s.ping()
            except (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError) as exc:
                raise SettingsError(f"MGPU_REDIS_URL / --redis-url: the sentinel at {host}:{port} refused the "
                                    f"sentinel_password ({exc}); {redacted(dsn)}") from None
            except redis.ConnectionError:
                pass  # down: no error here
            finally:
                s.close()
    client = sync_client(dsn, socket_connect_timeout=2, socket_timeout=3)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError) as exc:
        raise SettingsError(f"MGPU_REDIS_URL / --redis-url: Redis refused the credentials ({exc}); "
                            f"{redacted(dsn)}") from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc) or "NOPERM" in str(exc):
            raise SettingsError(f"MGPU_REDIS_URL / --redis-url: {exc} ({redacted(dsn)})") from None
        raise
    except FileNotFoundError as exc:
        raise SettingsError(f"MGPU_REDIS_TLS_CA / _CERT / _KEY: {exc}") from None
    except redis.ConnectionError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ssl.SSLError) or "SSL" in str(exc) or "certificate" in str(exc).lower():
            raise SettingsError(f"MGPU_REDIS_URL / MGPU_REDIS_TLS_*: the TLS handshake with Redis failed ({exc})"
                                ) from None
        if isinstance(cause, FileNotFoundError):
            raise SettingsError(f"MGPU_REDIS_TLS_CA / _CERT / _KEY: {cause}") from None
    finally:
        client.close()


def refused_by_acl(exc: BaseException) -> bool:
    """Whether Redis refused a command to this client's ACL user: NOPERM for a command, or the error a script
    raises when one of its commands touches a key the user may not (that one carries no NOPERM prefix)."""
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and "user executing the script can't access" in str(exc)
