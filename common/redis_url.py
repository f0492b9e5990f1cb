"""The Redis URLs mgpu accepts beyond redis-py's own: ``redis+sentinel://`` names the primary that Redis
Sentinel knows, ``redis+cluster://`` the seed nodes of a Redis Cluster (common.redis_conn connects to them).
No Redis import here: settings validate with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"


def _auth(netloc: str) -> tuple[str | None, str | None, str]:
    """(username, password, hosts) of a URL's netloc."""
    auth, _, hosts = netloc.rpartition("@")
    username = password = None
    if auth:
        user, sep, pw = auth.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if sep else None)
    return username, password, hosts


def _hosts(hosts: str, what: str) -> tuple[tuple[str, int], ...]:
    out = []
    for hp in hosts.split(","):
        host, sep, port = hp.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"a {what} is host:port, not {hp!r}")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


@dataclass(frozen=True)
class SentinelUrl:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db][?sentinel_password=...]``:
    the sentinels to ask, the primary's service name, and what the primary's connections use."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        if not url.startswith(SENTINEL_SCHEME):
            raise ValueError(f"not a {SENTINEL_SCHEME} URL")
        parts = urlsplit(url)
        username, password, hosts = _auth(parts.netloc)
        sentinels = _hosts(hosts, "sentinel")
        path = [p for p in parts.path.split("/") if p]
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError("the path is /<service name>[/<db>], e.g. /mymaster/0")
        query = parse_qs(parts.query)
        unknown = set(query) - {"sentinel_password"}
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)}; only sentinel_password")
        return cls(sentinels, path[0], int(path[1]) if len(path) == 2 else 0, username, password,
                   query.get("sentinel_password", [None])[0])

    def connection_kwargs(self) -> dict[str, Any]:
        return {"db": self.db, "username": self.username, "password": self.password}

    def sentinel_kwargs(self, timeout: float) -> dict[str, Any]:
        return {"password": self.sentinel_password, "socket_timeout": timeout, "socket_connect_timeout": timeout}


@dataclass(frozen=True)
class ClusterUrl:
    """``redis+cluster://[user:password@]host:port[,host:port...]``: seed nodes of a Redis Cluster (any of
    them; the client learns the rest from CLUSTER SLOTS) and the credentials every node takes.  A cluster has
    one database only, so there is no /db."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> ClusterUrl:
        if not url.startswith(CLUSTER_SCHEME):
            raise ValueError(f"not a {CLUSTER_SCHEME} URL")
        parts = urlsplit(url)
        username, password, hosts = _auth(parts.netloc)
        if parts.path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has database 0 only: no /<db> other than /0")
        if parts.query:
            raise ValueError("no parameters are accepted")
        return cls(_hosts(hosts, "cluster node"), username, password)
