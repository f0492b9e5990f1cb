"""Load generator for OpenAI-compatible endpoints (``mgpu bench``; also ``python -m ops.bench``).

Two load modes:

* **open loop** (``--rate R``): arrivals are a seeded Poisson process scheduled in advance,
  independent of completions.  Latency and TTFT count from the *scheduled* arrival time, so a
  request that the generator (or a full in-flight limit) could only send late is charged for the
  wait: no coordinated omission.  How late sends were (``lateness``) shows whether the generator
  itself kept up.
* **closed loop** (``--concurrency C``): ``C`` clients each send a request, wait for it, repeat.

Targets: an HTTP base URL (``/v1/chat/completions`` or ``/v1/completions``, streaming or not),
or ``--in-process``: a :class:`gpu_worker.engine.sim.SimEngine` driven in this process with the
same schedule and request mix, so that ``HTTP percentile - in-process percentile`` is the cost
the serving path adds (``--in-process-baseline`` runs both and prints that difference).

The HTTP client is a small asyncio HTTP/1.1 client (keep-alive pool, chunked transfer decoding,
incremental SSE parsing inside ``data_received``): on this project's 2-core test machine it needs
several times less CPU per request than aiohttp (``--client aiohttp`` is kept as a cross-check).
``--procs K`` splits the load over K processes and merges their raw samples.

Python use (a scenario harness)::

    result = await run_load(BenchConfig(url=..., rate=50, duration=30, stream=True))
    print(format_table([result]))

``--serve-dummy HOST:PORT`` runs a trivial OpenAI-like server (instant or paced replies), for
measuring the generator's own ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import gc
import itertools
import json
import math
import multiprocessing
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, cast
from urllib.parse import urlsplit

import orjson

if TYPE_CHECKING:
    from gpu_worker.engine.sim import SimEngine

perf_counter = time.perf_counter

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_TIMER_SLACK_S = 0.0005
LATE_WARN_MS = 5.0  # p99 send lateness above this: the generator did not keep up with its schedule
_WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
    "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform",
    "victor", "whiskey", "xray", "yankee", "zulu",
]


# ============================================================================ pure helpers


def parse_mix(spec: str) -> list[tuple[float, int]]:
    """Parse ``"0.9:32,0.1:1024"`` into ``[(0.9, 32), (0.1, 1024)]``.

    Fractions must be positive and sum to 1 (within 1e-6); max_tokens must be positive integers.
    """
    out: list[tuple[float, int]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        frac_s, sep, tok_s = part.partition(":")
        if not sep:
            raise ValueError(f"mix entry {part!r} is not FRACTION:MAX_TOKENS")
        try:
            frac, tokens = float(frac_s), int(tok_s)
        except ValueError:
            raise ValueError(f"mix entry {part!r} is not FRACTION:MAX_TOKENS") from None
        if not (frac > 0.0 and math.isfinite(frac)):
            raise ValueError(f"mix fraction must be positive, got {frac_s!r}")
        if tokens < 1:
            raise ValueError(f"mix max_tokens must be >= 1, got {tok_s!r}")
        out.append((frac, tokens))
    if not out:
        raise ValueError("empty mix")
    total = sum(f for f, _ in out)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"mix fractions sum to {total:g}, not 1")
    return out


class MixSampler:
    """Draws max_tokens per request from a ``parse_mix`` result with its own seeded RNG."""

    def __init__(self, mix: Sequence[tuple[float, int]], seed: int) -> None:
        self._rng = random.Random(seed)
        self._values = [t for _, t in mix]
        acc = 0.0
        self._cum: list[float] = []
        for frac, _ in mix:
            acc += frac
            self._cum.append(acc)

    def draw(self) -> int:
        if len(self._values) == 1:
            return self._values[0]
        u = self._rng.random() * self._cum[-1]
        return self._values[min(bisect.bisect_right(self._cum, u), len(self._values) - 1)]


def poisson_schedule(rate: float, horizon_s: float, seed: int, max_n: int | None = None) -> list[float]:
    """Arrival offsets (seconds from 0) of a Poisson process of ``rate``/s over ``[0, horizon_s)``."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while max_n is None or len(out) < max_n:
        t += rng.expovariate(rate)
        if t >= horizon_s:
            break
        out.append(t)
    return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of already-sorted values; NaN if empty."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if n == 1:
        return float(sorted_values[0])
    rank = (q / 100.0) * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def dist_ms(values_s: Sequence[float]) -> dict[str, float] | None:
    """p50/p90/p99/max/mean in milliseconds of values in seconds; None when there are none."""
    if not values_s:
        return None
    v = sorted(values_s)
    return {
        "p50": percentile(v, 50) * 1e3,
        "p90": percentile(v, 90) * 1e3,
        "p99": percentile(v, 99) * 1e3,
        "max": v[-1] * 1e3,
        "mean": sum(v) / len(v) * 1e3,
    }


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


# ============================================================================ one response


class _Response:
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


# ============================================================================ HTTP clients


class HttpProtocolError(Exception):
    """The server's reply is not valid HTTP/1.1 as this client understands it."""


class _StaleConnection(Exception):
    """A reused keep-alive connection closed before any reply byte: safe to retry once."""


_S_HEAD, _S_LEN, _S_CSIZE, _S_CDATA, _S_CCRLF, _S_TRAILER, _S_EOF = range(7)


class _HttpConn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time.

    The response parser works on ``bytes`` with an index (no per-chunk buffer copies) and hands
    all body bytes that one read produced to the response in a single ``on_data`` call.
    """

    def __init__(self, client: RawHttpClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.resp: _Response | None = None
        self.fut: asyncio.Future[None] | None = None
        self.pending = b""  # unparsed bytes of the current response
        self.state = _S_HEAD
        self.remaining = 0
        self.keep_alive = True
        self.got_bytes = False
        self.served = 0

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # bytes while idle: the server broke the protocol
            self.abort()
            return
        self.got_bytes = True
        buf = self.pending + data if self.pending else data
        try:
            pos = self._parse(buf, resp)
        except (ValueError, HttpProtocolError) as exc:
            self._fail(HttpProtocolError(str(exc)))
            self.abort()
            return
        self.pending = buf[pos:] if pos < len(buf) and self.resp is not None else b""

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._forget(self)
        resp = self.resp
        if resp is None:
            return
        if self.state == _S_EOF:
            self._complete(True)
        elif not self.got_bytes and self.served > 0:
            self._fail(_StaleConnection())
        else:
            self._fail(ConnectionResetError(f"connection closed mid-response ({exc or 'EOF'})"))

    # -- driving
    def start(self, data: bytes, resp: _Response, fut: asyncio.Future[None]) -> None:
        assert self.transport is not None
        self.resp = resp
        self.fut = fut
        self.state = _S_HEAD
        self.got_bytes = False
        self.keep_alive = True
        self.pending = b""
        self.transport.write(data)

    def on_timeout(self) -> None:
        if self.fut is not None:
            self._fail(TimeoutError("request timed out"))
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        fut = self.fut
        self.resp = None
        self.fut = None
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _complete(self, clean: bool) -> None:
        fut = self.fut
        self.resp = None
        self.fut = None
        self.served += 1
        self.state = _S_HEAD
        if clean and self.keep_alive and not self.closed:
            self.client._release(self)
        else:
            self.abort()
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _parse(self, buf: bytes, resp: _Response) -> int:
        """Consume what it can of ``buf``; return how many bytes it consumed."""
        pos = 0
        n = len(buf)
        parts: list[bytes] = []
        while True:
            state = self.state
            if state == _S_CSIZE:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                size = int(buf[pos:i].split(b";", 1)[0], 16)
                pos = i + 2
                if size == 0:
                    self.state = _S_TRAILER
                    continue
                end = pos + size
                if end + 2 <= n:  # the whole chunk is here (the common case)
                    if buf[end : end + 2] != b"\r\n":
                        raise HttpProtocolError("chunk not followed by CRLF")
                    parts.append(buf[pos:end])
                    pos = end + 2
                else:
                    self.remaining = size
                    self.state = _S_CDATA
            elif state == _S_CDATA:
                if pos >= n:
                    break
                take = min(self.remaining, n - pos)
                parts.append(buf[pos : pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = _S_CCRLF
            elif state == _S_CCRLF:
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise HttpProtocolError("chunk not followed by CRLF")
                pos += 2
                self.state = _S_CSIZE
            elif state == _S_HEAD:
                i = buf.find(b"\r\n\r\n", pos)
                if i < 0:
                    if n - pos > 65536:
                        raise HttpProtocolError("response head over 64 KiB")
                    break
                head = buf[pos:i]
                pos = i + 4
                if self._head(head, resp):
                    self._complete(pos == n)  # a reply without a body
                    return pos
            elif state == _S_LEN:
                if pos >= n:
                    break
                take = min(self.remaining, n - pos)
                parts.append(buf[pos : pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    resp.on_data(b"".join(parts))
                    self._complete(pos == n)
                    return pos
            elif state == _S_TRAILER:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                empty = i == pos
                pos = i + 2
                if empty:
                    if parts:
                        resp.on_data(b"".join(parts))
                    self._complete(pos == n)
                    return pos
            else:  # _S_EOF: the body runs until the server closes
                parts.append(buf[pos:])
                pos = n
                break
        if parts:
            resp.on_data(parts[0] if len(parts) == 1 else b"".join(parts))
        return pos

    def _head(self, head: bytes, resp: _Response) -> bool:
        """Parse a response head; True when the reply is complete without a body."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise HttpProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            return False  # interim response; the real one follows
        length: int | None = None
        chunked = False
        keep_alive = parts[0] != b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                v = value.strip().lower()
                if v == b"close":
                    keep_alive = False
                elif v == b"keep-alive":
                    keep_alive = True
        self.keep_alive = keep_alive
        resp.on_status(status)
        if status in (204, 304) or (length == 0 and not chunked):
            return True
        if chunked:
            self.state = _S_CSIZE
        elif length is not None:
            self.remaining = length
            self.state = _S_LEN
        else:
            self.keep_alive = False
            self.state = _S_EOF
        return False


class _Client(Protocol):
    async def send(self, body: bytes, resp: _Response, timeout: float) -> None: ...

    async def close(self) -> None: ...


def _split_url(url: str, endpoint: str) -> tuple[str, str, int, str, bool]:
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


class RawHttpClient:
    """Minimal asyncio HTTP/1.1 client: POST only, keep-alive pool (LIFO), no pool size limit.

    At most ``max_connecting`` connects run at once; a request that finds no idle connection and
    no free connect slot takes the next connection released.  Without that bound a burst of
    arrivals opens hundreds of connections at once, the connects (dearer than requests, and
    dropped once the server's accept queue fills) slow the loop, more requests pile up and open
    more connections: the run collapses (seen here at 12,500 req/s).
    """

    max_connecting = 16

    def __init__(
        self, url: str, endpoint: str, api_key: str | None = None, connect_timeout: float = 10.0
    ) -> None:
        _, self.host, self.port, path, tls = _split_url(url, endpoint)
        self.connect_timeout = connect_timeout
        self._ssl: bool | None = True if tls else None
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        host_hdr = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        self._prefix = (
            f"POST {path} HTTP/1.1\r\nHost: {host_hdr}\r\nUser-Agent: mgpu-bench\r\n"
            f"Content-Type: application/json\r\nAccept: */*\r\n{auth}Content-Length: "
        ).encode()
        self._idle: list[_HttpConn] = []
        self._all: set[_HttpConn] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[_HttpConn | None]] = deque()
        self.connections_opened = 0
        self.stale_retries = 0  # requests resent because a reused connection had been closed

    def _hand_over(self, conn: _HttpConn | None) -> bool:
        """Give the longest waiter ``conn`` (None: leave to connect); False when nobody waits."""
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return True
        return False

    def _release(self, conn: _HttpConn) -> None:
        if not self._hand_over(conn):
            self._idle.append(conn)

    def _wake_one(self) -> None:
        """A connect slot is free: the longest waiter may connect."""
        self._hand_over(None)

    def _forget(self, conn: _HttpConn) -> None:
        self._all.discard(conn)

    async def _connect(self) -> _HttpConn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):  # a full accept queue drops SYNs silently
            _, conn = await loop.create_connection(
                lambda: _HttpConn(self), self.host, self.port, ssl=self._ssl
            )
        self.connections_opened += 1
        self._all.add(conn)
        return conn

    async def _acquire(self) -> _HttpConn:
        idle = self._idle
        while True:
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    return conn
            if self._connecting < self.max_connecting:
                self._connecting += 1
                try:
                    return await self._connect()
                finally:
                    self._connecting -= 1
                    self._wake_one()
            fut: asyncio.Future[_HttpConn | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                got = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # handed over just before the cancel
                    handed = fut.result()
                    if handed is None:
                        self._wake_one()
                    else:
                        self._release(handed)
                raise
            if got is not None and not got.closed:
                return got

    async def prewarm(self, n: int) -> int:
        """Open ``n`` idle keep-alive connections (in batches); return how many opened.

        Without them, a burst in an open-loop run opens connections while it should be sending,
        which on a busy machine snowballs (connects are far dearer than requests).
        """
        opened = 0
        while opened < n:
            batch = min(64, n - opened)
            got = await asyncio.gather(*(self._connect() for _ in range(batch)), return_exceptions=True)
            conns = [c for c in got if isinstance(c, _HttpConn)]
            self._idle.extend(conns)
            opened += len(conns)
            if len(conns) < batch:
                break  # the target refuses connections: the run will count the errors
        return opened

    async def send(self, body: bytes, resp: _Response, timeout: float) -> None:
        data = b"%s%d\r\n\r\n%s" % (self._prefix, len(body), body)
        loop = asyncio.get_running_loop()
        for attempt in (0, 1):
            conn = await self._acquire()
            fut: asyncio.Future[None] = loop.create_future()
            resp.t_sent = perf_counter()
            conn.start(data, resp, fut)
            timer = loop.call_later(timeout, conn.on_timeout)
            try:
                await fut
                return
            except _StaleConnection:
                if attempt == 1:
                    raise ConnectionResetError("server closed two connections before replying") from None
                self.stale_retries += 1
                resp.reset()
            except BaseException:
                if conn.fut is fut:  # cancelled while in flight: the connection cannot be reused
                    conn._fail(asyncio.CancelledError())
                    conn.abort()
                raise
            finally:
                timer.cancel()

    async def close(self) -> None:
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        self._all.clear()


class AiohttpClient:
    """The same job done by aiohttp (a cross-check of the raw client; several times more CPU)."""

    def __init__(self, url: str, endpoint: str, api_key: str | None = None) -> None:
        """Construct inside the running loop (the session binds to it)."""
        import aiohttp  # here, not at the first request: an import mid-run would stall the schedule

        scheme, host, port, path, _ = _split_url(url, endpoint)
        self.url = f"{scheme}://{host}:{port}{path}"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._timeout_cls = aiohttp.ClientTimeout
        self._session: Any = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0), auto_decompress=False
        )

    async def send(self, body: bytes, resp: _Response, timeout: float) -> None:
        resp.t_sent = perf_counter()
        async with self._session.post(
            self.url, data=body, headers=self.headers, timeout=self._timeout_cls(total=timeout)
        ) as r:
            resp.on_status(r.status)
            async for data in r.content.iter_any():
                resp.on_data(data)

    async def close(self) -> None:
        await self._session.close()


# ============================================================================ config and results


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    model: str = DEFAULT_MODEL
    endpoint: Literal["chat", "completions"] = "chat"
    stream: bool = False
    max_tokens: int = 32
    mix: list[tuple[float, int]] | None = None  # overrides max_tokens
    prompt_words: int = 32
    rate: float | None = None  # open loop (req/s, all processes together)
    concurrency: int | None = None  # closed loop (clients, all processes together)
    duration: float = 10.0  # measured seconds (after warmup)
    warmup: float = 0.0
    requests: int | None = None  # stop after this many requests (warmup included), if sooner
    seed: int = 0
    timeout: float = 60.0  # per request, from its send
    connections: int | None = None  # raw client: keep-alive connections opened before the start (None: auto)
    max_inflight: int = 0  # 0: no limit (beyond the file-descriptor limit)
    procs: int = 1
    client: Literal["raw", "aiohttp"] = "raw"
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    in_process: bool = False
    sim_decode_ms: float = 10.0
    sim_decode_ms_per_seq: float = 0.1
    sim_prefill_ms_per_token: float = 0.02
    sim_slots: int = 32
    sim_max_model_len: int = 2048

    def validate(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be positive")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.duration <= 0 or self.warmup < 0 or self.timeout <= 0:
            raise ValueError("duration and timeout must be positive, warmup non-negative")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be >= 1")
        if self.procs < 1:
            raise ValueError("procs must be >= 1")
        if self.connections is not None and self.connections < 0:
            raise ValueError("connections must be >= 0")
        if self.concurrency is not None and self.procs > self.concurrency:
            raise ValueError("procs must not exceed concurrency")
        if self.in_process and self.procs != 1:
            raise ValueError("in-process mode runs in one process (procs=1)")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError("endpoint must be chat or completions")
        if self.max_tokens < 1 or self.prompt_words < 1:
            raise ValueError("max_tokens and prompt_words must be >= 1")

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def token_mix(self) -> list[tuple[float, int]]:
        return self.mix if self.mix else [(1.0, self.max_tokens)]


class Sample(NamedTuple):
    """One request; times are seconds from the run's start (shared by all processes)."""

    sched: float  # scheduled arrival (open loop) or start (closed loop)
    sent: float | None  # when its bytes were written (None: never sent)
    end: float
    first: float | None  # first content chunk (streaming / in-process)
    tokens: int
    chunks: int
    error: str | None  # None: success


@dataclass
class _ShardOutput:
    samples: list[Sample]
    cpu_s: float
    wall_s: float  # from the shared start to the last reply
    error_details: dict[str, str]
    connections: int


@dataclass
class BenchResult:
    label: str
    target: str  # "http" | "in-process"
    mode: str  # "open" | "closed"
    endpoint: str
    stream: bool
    rate: float | None
    concurrency: int | None
    procs: int
    client: str
    window_s: float  # measured seconds (throughput denominator)
    wall_s: float  # start to last reply (warmup and drain included; setup excluded)
    offered: int  # requests scheduled (open) / started (closed) in the measured window
    sent: int
    ok: int
    errors: dict[str, int]
    error_details: dict[str, str]
    throughput_rps: float  # ok completions inside the window / window
    tokens_per_s: float  # their completion tokens / window
    completion_tokens: int  # all ok measured requests
    latency_ms: dict[str, float] | None  # scheduled -> last byte, ok requests
    ttft_ms: dict[str, float] | None  # scheduled -> first content chunk
    service_ms: dict[str, float] | None  # sent -> last byte
    lateness_ms: dict[str, float] | None  # sent - scheduled (open loop)
    chunks_mean: float
    no_usage: int  # ok streaming replies without a usage chunk (tokens approximated by chunks)
    connections: int
    cpu_s: float  # generator CPU (all processes; in-process mode includes the engine)
    samples: list[Sample] = field(default_factory=list, repr=False)

    @property
    def fell_behind(self) -> bool:
        return bool(self.lateness_ms and self.lateness_ms["p99"] > LATE_WARN_MS)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "samples"}
        d["cpu_util"] = self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0
        d["fell_behind"] = self.fell_behind
        if with_samples:
            d["samples"] = [s._asdict() for s in self.samples]
        return d


def summarize(
    cfg: BenchConfig,
    samples: list[Sample],
    wall_s: float,
    cpu_s: float = 0.0,
    error_details: dict[str, str] | None = None,
    connections: int = 0,
) -> BenchResult:
    """Statistics over the requests scheduled inside ``[warmup, warmup + duration)``.

    Throughput and tokens/s count successes that *completed* inside the window; when the run was
    cut short by ``requests``, the window ends at the last measured completion instead.
    """
    w0 = cfg.warmup
    w1 = cfg.warmup + cfg.duration
    measured = [s for s in samples if w0 <= s.sched < w1]
    ok = [s for s in measured if s.error is None]
    if measured and cfg.requests is not None:
        w1 = min(w1, max(s.end for s in measured))
    window = max(w1 - w0, 1e-9)
    # completions inside the window, whenever they were scheduled (warmup ones included): steady state
    done_in_window = [s for s in samples if s.error is None and w0 <= s.end <= w1]
    errors: dict[str, int] = {}
    for s in measured:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    sent = [s for s in measured if s.sent is not None]
    is_open = cfg.rate is not None
    stream_like = cfg.stream or cfg.in_process
    return BenchResult(
        label=cfg.label,
        target="in-process" if cfg.in_process else "http",
        mode=cfg.mode,
        endpoint=cfg.endpoint,
        stream=cfg.stream,
        rate=cfg.rate,
        concurrency=cfg.concurrency,
        procs=cfg.procs,
        client="sim" if cfg.in_process else cfg.client,
        window_s=window,
        wall_s=wall_s,
        offered=len(measured),
        sent=len(sent),
        ok=len(ok),
        errors=dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        error_details={k: v for k, v in (error_details or {}).items() if k in errors},
        throughput_rps=len(done_in_window) / window,
        tokens_per_s=sum(s.tokens for s in done_in_window) / window,
        completion_tokens=sum(s.tokens for s in ok),
        latency_ms=dist_ms([s.end - s.sched for s in ok]),
        ttft_ms=dist_ms([s.first - s.sched for s in ok if s.first is not None]) if stream_like else None,
        service_ms=dist_ms([s.end - s.sent for s in ok if s.sent is not None]),
        lateness_ms=dist_ms([s.sent - s.sched for s in sent if s.sent is not None]) if is_open else None,
        chunks_mean=sum(s.chunks for s in ok) / len(ok) if ok else 0.0,
        no_usage=0,
        connections=connections,
        cpu_s=cpu_s,
        samples=samples,
    )


# ============================================================================ the load generator


def _shard_requests(cfg: BenchConfig, shard: int, nshards: int) -> int | None:
    if cfg.requests is None:
        return None
    return cfg.requests // nshards + (1 if shard < cfg.requests % nshards else 0)


def arrival_schedule(cfg: BenchConfig, shard: int = 0, nshards: int = 1) -> list[float]:
    """The open-loop arrival offsets (seconds from the start) that process ``shard`` of ``nshards`` sends."""
    assert cfg.rate is not None
    return poisson_schedule(
        cfg.rate / nshards, cfg.warmup + cfg.duration, seed=cfg.seed * 7919 + 2 * shard,
        max_n=_shard_requests(cfg, shard, nshards),
    )


def _prompt(words: int, tag: str) -> str:
    # a unique first word keeps prompts distinct (no prefix-cache sharing between requests)
    body = [_WORDS[i % len(_WORDS)] for i in range(words - 1)]
    return " ".join([tag, *body])


class _Shard:
    """One process's share of the load."""

    def __init__(self, cfg: BenchConfig, shard: int = 0, nshards: int = 1) -> None:
        self.cfg = cfg
        self.shard = shard
        self.samples: list[Sample] = []
        self.error_details: dict[str, str] = {}
        self.no_usage = 0
        self._t0 = 0.0
        self._mix = MixSampler(cfg.token_mix(), seed=cfg.seed * 7919 + 2 * shard + 1)
        self._prompt_tail = _prompt(cfg.prompt_words, "")
        self._chat = cfg.endpoint == "chat"
        self._schedule: list[float] = []
        self._concurrency = 0
        self._rate = (cfg.rate or 0.0) / nshards
        self._requests = _shard_requests(cfg, shard, nshards)
        if cfg.rate is not None:
            self._schedule = arrival_schedule(cfg, shard, nshards)
        else:
            assert cfg.concurrency is not None
            self._concurrency = cfg.concurrency // nshards + (1 if shard < cfg.concurrency % nshards else 0)
        self._client: _Client | None = None
        self._engine: SimEngine | None = None
        limit = cfg.max_inflight or max(1, _nofile_limit() - 64)
        self._sem: asyncio.Semaphore | None = asyncio.Semaphore(limit) if cfg.rate is not None else None

    async def open(self) -> None:
        cfg = self.cfg
        if cfg.in_process:
            from gpu_worker.engine.sim import SimEngine

            self._engine = SimEngine(
                slots=cfg.sim_slots, max_model_len=cfg.sim_max_model_len,
                prefill_ms_per_token=cfg.sim_prefill_ms_per_token, decode_ms=cfg.sim_decode_ms,
                decode_ms_per_seq=cfg.sim_decode_ms_per_seq,
            )
            await self._engine.start()
        elif cfg.client == "aiohttp":
            self._client = AiohttpClient(cfg.url, cfg.endpoint, cfg.api_key)
        else:
            client = RawHttpClient(cfg.url, cfg.endpoint, cfg.api_key, connect_timeout=cfg.timeout)
            self._client = client
            await client.prewarm(self._prewarm_count())

    def _prewarm_count(self) -> int:
        if self.cfg.connections is not None:
            return self.cfg.connections
        if self.cfg.rate is None:
            return self._concurrency
        # about 20 ms worth of arrivals, so a burst finds connections ready
        return min(256, 4 + math.ceil(self._rate * 0.02))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._engine is not None:
            await self._engine.shutdown()

    @property
    def connections(self) -> int:
        return self._client.connections_opened if isinstance(self._client, RawHttpClient) else 0

    async def run(self, t0: float) -> None:
        """Run the schedule; ``t0`` is the ``perf_counter`` time that offsets count from."""
        self._t0 = t0
        if self.cfg.rate is not None:
            await self._open_loop()
        else:
            await self._closed_loop()

    async def _open_loop(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = self._t0
        tasks: set[asyncio.Task[None]] = set()
        for i, off in enumerate(self._schedule):
            at = t0 + off
            while (delay := at - perf_counter()) > 0:
                # uvloop's timers have 1 ms granularity and round to nearest: a plain sleep(delay)
                # would wake early (sending before the schedule) or spin; round up instead, so a
                # send is never early and at most ~1 ms late (measured: ``lateness``)
                await asyncio.sleep(delay + _TIMER_SLACK_S)
            task = loop.create_task(self._request(i, at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.cfg.timeout + 5.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _closed_loop(self) -> None:
        end = self._t0 + self.cfg.warmup + self.cfg.duration
        counter = itertools.count()
        limit = self._requests

        async def client() -> None:
            while True:
                now = perf_counter()
                if now >= end:
                    return
                i = next(counter)
                if limit is not None and i >= limit:
                    return
                await self._request(i, now)

        await asyncio.gather(*(client() for _ in range(self._concurrency)))

    async def _request(self, i: int, sched: float) -> None:
        max_tokens = self._mix.draw()
        tag = f"r{self.shard}-{i}"
        sent: float | None = None
        first: float | None = None
        tokens = chunks = 0
        error: str | None = None
        detail = ""
        try:
            if self._sem is not None:
                await self._sem.acquire()
            try:
                if self._engine is not None:
                    sent, first, tokens, chunks, error = await self._engine_request(tag, max_tokens)
                else:
                    resp = _Response(self.cfg.stream, self._chat)
                    try:
                        await self._http_request(tag, max_tokens, resp)
                        resp.finish()
                    finally:
                        sent, first, tokens, chunks = resp.t_sent, resp.t_first, resp.tokens, resp.chunks
                    error, detail = resp.error, resp.detail
                    if error is None and self.cfg.stream and not resp.usage_seen:
                        self.no_usage += 1
            finally:
                if self._sem is not None:
                    self._sem.release()
        except asyncio.CancelledError:
            error = "Unfinished"
            raise
        except TimeoutError as exc:  # one name for every client's flavour of timeout
            error = "TimeoutError"
            detail = str(exc)[:300]
        except Exception as exc:  # every failure is a counted outcome, never a crash of the run
            error = type(exc).__name__
            detail = str(exc)[:300]
        finally:
            t0 = self._t0
            self.samples.append(Sample(
                sched - t0, None if sent is None else sent - t0, perf_counter() - t0,
                None if first is None else first - t0, tokens, chunks, error,
            ))
            if error is not None and error not in self.error_details:
                self.error_details[error] = detail

    async def _http_request(self, tag: str, max_tokens: int, resp: _Response) -> None:
        cfg = self.cfg
        text = tag + self._prompt_tail
        payload: dict[str, Any] = {"model": cfg.model, "max_tokens": max_tokens}
        if self._chat:
            payload["messages"] = [{"role": "user", "content": text}]
        else:
            payload["prompt"] = text
        if cfg.stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        if cfg.extra_body:
            payload.update(cfg.extra_body)
        assert self._client is not None
        await self._client.send(orjson.dumps(payload), resp, cfg.timeout)

    async def _engine_request(
        self, tag: str, max_tokens: int
    ) -> tuple[float, float | None, int, int, str | None]:
        from common.schemas import SamplingParams
        from gpu_worker.engine.base import EngineRequest

        assert self._engine is not None
        text = tag + self._prompt_tail
        req = EngineRequest(
            request_id=f"bench-{tag}",
            prompt=None if self._chat else text,
            messages=[{"role": "user", "content": text}] if self._chat else None,
            params=SamplingParams(max_tokens=max_tokens),
        )
        first: float | None = None
        tokens = chunks = 0
        finished = False
        sent = perf_counter()
        async with asyncio.timeout(self.cfg.timeout):
            gen = self._engine.generate(req)
            try:
                async for out in gen:
                    if out.text:
                        chunks += 1
                        if first is None:
                            first = perf_counter()
                    tokens = out.completion_tokens
                    if out.finish_reason is not None:
                        finished = True
            finally:
                aclose = getattr(gen, "aclose", None)
                if aclose is not None:
                    await aclose()
        return sent, first, tokens, chunks, None if finished else "IncompleteStream"


def _nofile_limit() -> int:
    try:
        import resource

        return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, ValueError, OSError):
        return 1024


def _raise_nofile() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


async def _run_shard(cfg: BenchConfig, shard: int, nshards: int, start: Callable[[], float]) -> _ShardOutput:
    """Prepare a shard, get the shared start time from ``start()``, run, return raw samples."""
    runner = _Shard(cfg, shard, nshards)
    await runner.open()
    try:
        t0 = start()
        cpu0 = time.process_time()
        delay = t0 - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await runner.run(t0)
        cpu = time.process_time() - cpu0
        wall = perf_counter() - t0
    finally:
        await runner.close()
    details = dict(runner.error_details)
    if runner.no_usage:
        details["_no_usage"] = str(runner.no_usage)
    return _ShardOutput(runner.samples, cpu, wall, details, runner.connections)


def _shard_main(conn: Connection, cfg: BenchConfig, shard: int, nshards: int) -> None:
    """Entry point of a ``--procs`` child: handshake, run, send samples back."""
    _raise_nofile()

    def start() -> float:
        conn.send("ready")
        start_wall = float(conn.recv())
        return perf_counter() + (start_wall - time.time())

    try:
        gc.collect()
        gc.freeze()
        out = _run(_run_shard(cfg, shard, nshards, start))
        conn.send(("ok", out))
    except BaseException as exc:  # report, do not hang the parent
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def _run_procs(cfg: BenchConfig) -> list[_ShardOutput]:
    ctx = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    pipes: list[Connection] = []
    procs: list[Any] = []
    target = _shard_main
    if __name__ == "__main__":  # run as a script: let the children import this module by name
        import importlib

        target = importlib.import_module("ops.bench")._shard_main
    try:
        for k in range(cfg.procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=target, args=(child, cfg, k, cfg.procs), daemon=True)
            p.start()
            child.close()
            pipes.append(parent)
            procs.append(p)
        for pipe in pipes:
            msg = await asyncio.wait_for(loop.run_in_executor(None, pipe.recv), 60.0)
            if msg != "ready":
                why = msg[1] if isinstance(msg, tuple) else msg
                raise RuntimeError(f"bench child failed to start: {why}")
        start_wall = time.time() + 0.05
        for pipe in pipes:
            pipe.send(start_wall)
        horizon = cfg.warmup + cfg.duration + cfg.timeout + 60.0
        outs: list[_ShardOutput] = []
        for pipe in pipes:
            status, payload = await asyncio.wait_for(loop.run_in_executor(None, pipe.recv), horizon)
            if status != "ok":
                raise RuntimeError(f"bench child failed: {payload}")
            outs.append(payload)
        return outs
    finally:
        for pipe in pipes:
            pipe.close()
        for p in procs:
            await loop.run_in_executor(None, p.join, 5.0)
            if p.is_alive():
                p.kill()


async def run_load(cfg: BenchConfig) -> BenchResult:
    """Run one benchmark (HTTP or in-process; one process or ``cfg.procs``) and summarize it."""
    cfg.validate()
    if cfg.procs > 1:
        outs = await _run_procs(cfg)
    else:
        outs = [await _run_shard(cfg, 0, 1, lambda: perf_counter() + 0.001)]
    wall = max(o.wall_s for o in outs)
    samples = [s for out in outs for s in out.samples]
    samples.sort(key=lambda s: s.sched)
    details: dict[str, str] = {}
    no_usage = 0
    for out in outs:
        no_usage += int(out.error_details.pop("_no_usage", "0"))
        for k, v in out.error_details.items():
            details.setdefault(k, v)
    result = summarize(
        cfg, samples, wall, cpu_s=sum(o.cpu_s for o in outs), error_details=details,
        connections=sum(o.connections for o in outs),
    )
    result.no_usage = no_usage
    return result


def overhead_ms(http: BenchResult, base: BenchResult) -> dict[str, float]:
    """``http - base`` per latency (and TTFT) percentile: what the serving path adds."""
    out: dict[str, float] = {}
    for name in ("latency_ms", "ttft_ms"):
        a, b = getattr(http, name), getattr(base, name)
        if a and b:
            for q in ("p50", "p90", "p99", "mean"):
                out[f"{name[:-3]}_{q}"] = a[q] - b[q]
    return out


# ============================================================================ reporting


def _f(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


_COLUMNS = (
    "label", "target", "load", "offered", "ok", "err", "req/s", "tok/s",
    "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms", "ttft50", "ttft90", "ttft99",
    "late avg", "late max", "cpu%",
)


def _row(r: BenchResult) -> list[str]:
    lat = r.latency_ms or {}
    ttft = r.ttft_ms or {}
    late = r.lateness_ms or {}
    load = f"{r.rate:g}/s" if r.rate is not None else f"c={r.concurrency}"
    return [
        r.label or "-", r.target + ("/sse" if r.stream else ""), load, str(r.offered), str(r.ok),
        str(r.error_count), _f(r.throughput_rps), _f(r.tokens_per_s, 0),
        _f(lat.get("p50")), _f(lat.get("p90")), _f(lat.get("p99")), _f(lat.get("max")), _f(lat.get("mean")),
        _f(ttft.get("p50")), _f(ttft.get("p90")), _f(ttft.get("p99")),
        _f(late.get("mean"), 2), _f(late.get("max"), 1),
        _f(100.0 * r.cpu_s / r.wall_s if r.wall_s > 0 else 0.0, 0),
    ]


def format_table(results: Sequence[BenchResult], markdown: bool = False) -> str:
    """One row per result, then error breakdowns and warnings; ``markdown`` for docs tables."""
    rows = [list(_COLUMNS)] + [_row(r) for r in results]
    lines: list[str] = []
    if markdown:
        lines.append("| " + " | ".join(rows[0]) + " |")
        lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(rows[0]))) + "|")
        lines.extend("| " + " | ".join(r) + " |" for r in rows[1:])
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = (c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            lines.append("  ".join(cells).rstrip())
    notes: list[str] = []
    for r in results:
        name = r.label or r.target
        if r.errors:
            parts = ", ".join(f"{k}: {v}" for k, v in r.errors.items())
            notes.append(f"{name}: errors {parts}")
            for k, v in r.error_details.items():
                if v:
                    notes.append(f"  {k}: {v[:160]}")
        if r.fell_behind and r.lateness_ms:
            notes.append(
                f"{name}: WARNING the generator fell behind its schedule (send lateness p99 "
                f"{r.lateness_ms['p99']:.1f} ms, max {r.lateness_ms['max']:.1f} ms); latencies still count "
                "from the schedule; consider --procs"
            )
        if r.no_usage:
            notes.append(f"{name}: {r.no_usage} streamed replies had no usage chunk; tokens = content chunks")
    return "\n".join(lines + (["", *notes] if notes else []))


# ============================================================================ dummy server


class _DummyServer(asyncio.Protocol):
    """A trivial OpenAI-like HTTP/1.1 server: replies with ``max_tokens`` one-word tokens.

    ``delay_s`` paces it: a non-streaming reply comes after ``delay_s``; a stream sends one token
    every ``delay_s`` (0: all at once).
    """

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = bytes(self.buf[:i])
            lower = head.lower()
            j = lower.find(b"\r\ncontent-length:")
            n = int(lower[j + 17:].split(b"\r\n", 1)[0]) if j >= 0 else 0
            if len(self.buf) < i + 4 + n:
                return
            body = bytes(self.buf[i + 4 : i + 4 + n])
            del self.buf[: i + 4 + n]
            self._handle(head.split(b" ", 2)[1], body)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _handle(self, path: bytes, body: bytes) -> None:
        chat = path.endswith(b"/chat/completions")
        if not (chat or path.endswith(b"/completions")):
            msg = b'{"error":{"message":"not found"}}'
            head = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            self._write(head % len(msg) + msg)
            return
        try:
            req = orjson.loads(body)
            n = int(req.get("max_tokens") or 16)
            stream = bool(req.get("stream"))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            n, stream = 16, False
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        loop = asyncio.get_running_loop()
        if not stream:
            text = " w" * n
            msg_or_text: dict[str, Any] = (
                {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            )
            choice = {"index": 0, **msg_or_text, "finish_reason": "length"}
            out = orjson.dumps({"id": "x", "object": "chat.completion" if chat else "text_completion",
                                "model": req.get("model", ""), "choices": [choice], "usage": usage})
            reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                len(out), out)
            if self.delay_s > 0:
                loop.call_later(self.delay_s, self._write, reply)
            else:
                self._write(reply)
            return
        piece = (b'{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" w"},'
                 b'"finish_reason":null}]}' if chat else
                 b'{"id":"x","object":"text_completion","choices":[{"index":0,"text":" w",'
                 b'"finish_reason":null}]}')
        events = [b"data: " + piece + b"\n\n"] * n
        events.append(b"data: " + orjson.dumps({"id": "x", "choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        chunks = [b"%x\r\n%s\r\n" % (len(e), e) for e in events] + [b"0\r\n\r\n"]
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        if self.delay_s > 0:
            self._write(head)
            for k, c in enumerate(chunks[:-3]):
                loop.call_later(self.delay_s * (k + 1), self._write, c)
            loop.call_later(self.delay_s * n, self._write, b"".join(chunks[-3:]))
        else:
            self._write(head + b"".join(chunks))


async def serve_dummy(
    host: str, port: int, delay_s: float = 0.0, ready: Callable[[int], None] | None = None
) -> None:
    """Serve the dummy endpoints until cancelled; ``ready(port)`` is called once listening."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _DummyServer(delay_s), host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(int(bound))
    async with server:
        await server.serve_forever()


# ============================================================================ command line


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgpu bench",
        description="Load-test an OpenAI-compatible endpoint (or the sim engine in-process).",
    )
    t = p.add_argument_group("target")
    t.add_argument("--url", default="http://127.0.0.1:8000", help="base URL (default %(default)s)")
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    t.add_argument("--stream", action="store_true", help="request SSE streams; measure TTFT")
    t.add_argument("--api-key", default=os.environ.get("MGPU_API_KEY"))
    t.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    t.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                   help="HTTP client: the built-in raw asyncio one (cheapest) or aiohttp")
    r = p.add_argument_group("requests")
    r.add_argument("--max-tokens", type=int, default=32)
    r.add_argument("--mix", default=None,
                   help='max_tokens mix, e.g. "0.9:32,0.1:1024" (overrides --max-tokens)')
    r.add_argument("--prompt-words", type=int, default=32)
    r.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    lg = p.add_argument_group("load")
    m = lg.add_mutually_exclusive_group()
    m.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    m.add_argument("--concurrency", type=int, help="closed loop: concurrent clients")
    lg.add_argument("--duration", type=float, default=10.0, help="measured seconds (default %(default)s)")
    lg.add_argument("--warmup", type=float, default=0.0, help="seconds before measuring")
    lg.add_argument("--requests", type=int, default=None, help="stop after this many requests, if sooner")
    lg.add_argument("--seed", type=int, default=0)
    lg.add_argument("--max-inflight", type=int, default=0, help="open loop: in-flight cap (0: fd limit)")
    lg.add_argument("--procs", type=int, default=1, help="split the load over K processes")
    lg.add_argument("--connections", type=int, default=None,
                    help="raw client: connections to open before the start (default: auto)")
    s = p.add_argument_group("in-process sim engine")
    s.add_argument("--in-process", action="store_true", help="no HTTP: drive a SimEngine in this process")
    s.add_argument("--in-process-baseline", action="store_true",
                   help="after the HTTP run, run the same load in-process and print the difference")
    s.add_argument("--sim-decode-ms", type=float, default=10.0)
    s.add_argument("--sim-decode-ms-per-seq", type=float, default=0.1)
    s.add_argument("--sim-prefill-ms-per-token", type=float, default=0.02)
    s.add_argument("--sim-slots", type=int, default=32)
    s.add_argument("--sim-max-model-len", type=int, default=2048)
    o = p.add_argument_group("output")
    o.add_argument("--json", dest="json_path", default=None, help="write results as JSON here")
    o.add_argument("--raw-samples", action="store_true", help="include per-request samples in the JSON")
    o.add_argument("--markdown", action="store_true", help="print a markdown table")
    o.add_argument("--label", default="")
    p.add_argument("--serve-dummy", metavar="HOST:PORT", default=None,
                   help="run a trivial OpenAI-like server instead (for measuring the generator)")
    p.add_argument("--dummy-delay-ms", type=float, default=0.0, help="dummy server: reply / per-token delay")
    return p


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    extra: dict[str, Any] = {}
    if a.extra_body:
        parsed = json.loads(a.extra_body)
        if not isinstance(parsed, dict):
            raise ValueError("--extra-body must be a JSON object")
        extra = parsed
    cfg = BenchConfig(
        url=a.url, model=a.model, endpoint=a.endpoint, stream=a.stream, max_tokens=a.max_tokens,
        mix=parse_mix(a.mix) if a.mix else None, prompt_words=a.prompt_words, rate=a.rate,
        concurrency=a.concurrency, duration=a.duration, warmup=a.warmup, requests=a.requests, seed=a.seed,
        timeout=a.timeout, connections=a.connections, max_inflight=a.max_inflight, procs=a.procs,
        client=a.client, api_key=a.api_key,
        extra_body=extra, label=a.label, in_process=a.in_process, sim_decode_ms=a.sim_decode_ms,
        sim_decode_ms_per_seq=a.sim_decode_ms_per_seq, sim_prefill_ms_per_token=a.sim_prefill_ms_per_token,
        sim_slots=a.sim_slots, sim_max_model_len=a.sim_max_model_len,
    )
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.serve_dummy:
        host, _, port = a.serve_dummy.rpartition(":")
        try:
            _run(serve_dummy(host or "127.0.0.1", int(port), a.dummy_delay_ms / 1e3,
                             ready=lambda p: print(f"dummy server on {host or '127.0.0.1'}:{p}", flush=True)))
        except KeyboardInterrupt:
            pass
        return 0
    try:
        cfg = config_from_args(a)
    except ValueError as exc:
        parser.error(str(exc))
    if a.in_process_baseline and cfg.in_process:
        parser.error("--in-process-baseline compares an HTTP run; drop --in-process")
    _raise_nofile()
    if cfg.procs == 1:
        gc.collect()
        gc.freeze()

    async def go() -> list[BenchResult]:
        results = [await run_load(cfg)]
        if a.in_process_baseline:
            label = (cfg.label + " in-process").strip()
            base = dataclasses.replace(cfg, in_process=True, procs=1, label=label)
            results.append(await run_load(base))
        return results

    results: list[BenchResult] = _run(go())
    print(format_table(results, markdown=a.markdown))
    doc: dict[str, Any] = {"results": [r.to_dict(with_samples=a.raw_samples) for r in results]}
    if len(results) == 2:
        doc["overhead_ms"] = overhead_ms(results[0], results[1])
        print("\nadded by the HTTP path (http - in-process), ms: "
              + ", ".join(f"{k} {v:.2f}" for k, v in doc["overhead_ms"].items()))
    if a.json_path:
        with open(a.json_path, "wb") as fh:
            fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0 if all(r.ok > 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
