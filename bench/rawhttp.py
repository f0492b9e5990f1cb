"""A minimal asyncio HTTP/1.1 client for the load generator (``--client raw``): POST only, a
keep-alive pool, chunked transfer decoding, the body handed to :class:`bench.client.Response` as
each read arrives (which parses SSE incrementally).

It exists only because it needs about half the CPU per request that aiohttp needs: measured on
2026-12-01 with ``python -m bench.clientcost`` (2 cores, no GPU; open loop, 300 req/s, 3,000
requests a run, 3 repetitions, dummy server and gateway + sim worker, JSON and SSE), aiohttp took
1.99-2.14x the raw client's CPU per request (1.78x at the lowest in one repetition); see
docs/benchmarks.md, section 6.  :class:`bench.client.AiohttpClient` (``--client aiohttp``) is the
cross-check: the tests run both against the same server.  Rerun the measurement when either
changes; drop this module if the gap falls under 1.5x.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import cast

from bench.client import Response, split_url

perf_counter = time.perf_counter


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
        self.resp: Response | None = None
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
    def start(self, data: bytes, resp: Response, fut: asyncio.Future[None]) -> None:
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

    def _parse(self, buf: bytes, resp: Response) -> int:
        """Consume what it can of ``buf``; return how many bytes it consumed.

        One loop over the parser's states, in one function (about 80 lines): it runs for every
        read of every response, and a method call per state would add to the CPU per request that
        is this client's reason to exist."""
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

    def _head(self, head: bytes, resp: Response) -> bool:
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
        _, self.host, self.port, path, tls = split_url(url, endpoint)
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

    async def send(self, body: bytes, resp: Response, timeout: float) -> None:
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
