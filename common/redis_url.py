"""The Redis URLs mgpu accepts beyond redis-py's own: ``redis+sentinel://`` names the primary that Redis
Sentinel knows (common.redis_conn connects to it).  No Redis import here: settings validate with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SENTINEL_SCHEME = "redis+sentinel://"


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
        auth, _, hosts = parts.netloc.rpartition("@")
        username = password = None
        if auth:
            user, sep, pw = auth.partition(":")
            username, password = (unquote(user) or None), (unquote(pw) if sep else None)
        sentinels = []
        for hp in hosts.split(","):
            host, sep, port = hp.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"a sentinel is host:port, not {hp!r}")
            sentinels.append((host.strip("[]"), int(port)))
        path = [p for p in parts.path.split("/") if p]
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError("the path is /<service name>[/<db>], e.g. /mymaster/0")
        query = parse_qs(parts.query)
        unknown = set(query) - {"sentinel_password"}
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)}; only sentinel_password")
        return cls(tuple(sentinels), path[0], int(path[1]) if len(path) == 2 else 0, username, password,
                   query.get("sentinel_password", [None])[0])

    def connection_kwargs(self) -> dict[str, Any]:
        return {"db": self.db, "username": self.username, "password": self.password}

    def sentinel_kwargs(self, timeout: float) -> dict[str, Any]:
        return {"password": self.sentinel_password, "socket_timeout": timeout, "socket_connect_timeout": timeout}
