"""What the load generator sends with and how it reads a reply: the :class:`Client` protocol, the
aiohttp client, and :class:`Response`, which turns one reply's bytes (a JSON body or an SSE stream,
parsed incrementally by :class:`SSEParser`) into status, first-content time, tokens and an error class.

A client feeds a :class:`Response` through ``on_status`` and ``on_data``; the runner calls
:meth:`Response.finish` to classify the exchange.
"""

from __future__ import annotations

import time
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

perf_counter = time.perf_counter


class SSEParser:
    """Incremental Server-Sent-Events parser: feed bytes as they arrive, get complete events' data.

    Lines may end in ``\\n`` or ``\\r\\n``; an event ends at a blank line; several ``data:``
    lines of one event are joined with ``\\n``; comments and other fields are ignored.
    """

    __slots__ = ("_buf", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:  # a CR that ends this chunk stays in the tail and pairs with the next LF
            buf = buf.replace(b"\r\n", b"\n")
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        out: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value[:1] == b" " else value)
        self._data = data
        return out


class Response:
    """What one HTTP exchange produced; fed by the transport, classified by :meth:`finish`."""

    __slots__ = ("_body", "_sse", "chat", "chunks", "detail", "done", "error", "status", "stream", "t_first",
                 "t_sent", "tokens", "usage_seen")

    def __init__(self, stream: bool, chat: bool) -> None:
        self.stream = stream
        self.chat = chat
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.t_sent: float | None = None
        self.t_first: float | None = None
        self.chunks = 0
        self.tokens = 0
        self.done = False
        self.error: str | None = None
        self.detail = ""
        self.usage_seen = False
        self._sse: SSEParser | None = None
        self._body: list[bytes] = []

    def on_status(self, status: int) -> None:
        self.status = status
        if self.stream and status == 200:
            self._sse = SSEParser()

    def on_data(self, data: bytes) -> None:
        if self._sse is None:
            self._body.append(data)
            return
        for event in self._sse.feed(data):
            self._event(event)

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._set_error("BadChunk", data)
            return
        if not isinstance(obj, dict):
            return
        if obj.get("error"):
            self._set_error("StreamError", data)
            return
        choices = obj.get("choices")
        if choices:
            c0 = choices[0]
            piece = (c0.get("delta") or {}).get("content") if self.chat else c0.get("text")
            if piece:
                self.chunks += 1
                if self.t_first is None:
                    self.t_first = perf_counter()
        usage = obj.get("usage")
        if usage:
            self.tokens = int(usage.get("completion_tokens") or 0)
            self.usage_seen = True

    def _set_error(self, key: str, data: bytes) -> None:
        if self.error is None:
            self.error = key
            self.detail = data[:300].decode("utf-8", "replace")

    def finish(self) -> None:
        """Classify the finished exchange: ``error`` stays None only for a complete success."""
        if self.status != 200:
            self._set_error(f"HTTP {self.status}", b"".join(self._body))
        elif self.stream:
            if self.error is None and not self.done:
                self._set_error("IncompleteStream", b"")
            if not self.usage_seen:
                self.tokens = self.chunks  # no usage chunk: one content chunk per token, approximately
        else:
            body = b"".join(self._body)
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                self._set_error("BadJSON", body)
                return
            if not isinstance(obj, dict) or obj.get("error") or not obj.get("choices"):
                self._set_error("BodyError", body)
                return
            usage = obj.get("usage")
            if usage:
                self.tokens = int(usage.get("completion_tokens") or 0)
                self.usage_seen = True


class Client(Protocol):
    """What the runner needs of an HTTP client: send one POST body, feeding ``resp``; close."""

    async def send(self, body: bytes, resp: Response, timeout: float) -> None: ...

    async def close(self) -> None: ...


def split_url(url: str, endpoint: str) -> tuple[str, str, int, str, bool]:
    """(scheme, host, port, request path, tls) for ``endpoint`` under the base ``url``."""
    u = urlsplit(url if "://" in url else "http://" + url)
    if u.scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {u.scheme!r}")
    tls = u.scheme == "https"
    host = u.hostname or "127.0.0.1"
    port = u.port or (443 if tls else 80)
    prefix = u.path.rstrip("/")
    if prefix.endswith("/v1"):
        prefix = prefix[:-3]
    path = prefix + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
    return u.scheme, host, port, path, tls


class AiohttpClient:
    """The same job done by aiohttp: the cross-check of :mod:`bench.rawhttp` (about twice its CPU per
    request; docs/benchmarks.md, section 6)."""

    def __init__(self, url: str, endpoint: str, api_key: str | None = None) -> None:
        """Construct inside the running loop (the session binds to it)."""
        import aiohttp  # here, not at the first request: an import mid-run would stall the schedule

        scheme, host, port, path, _ = split_url(url, endpoint)
        self.url = f"{scheme}://{host}:{port}{path}"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._timeout_cls = aiohttp.ClientTimeout
        self._session: Any = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0), auto_decompress=False
        )

    async def send(self, body: bytes, resp: Response, timeout: float) -> None:
        resp.t_sent = perf_counter()
        async with self._session.post(
            self.url, data=body, headers=self.headers, timeout=self._timeout_cls(total=timeout)
        ) as r:
            resp.on_status(r.status)
            async for data in r.content.iter_any():
                resp.on_data(data)

    async def close(self) -> None:
        await self._session.close()
