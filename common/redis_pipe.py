"""One Redis connection that many callers share, its commands pipelined: each caller's commands are written at
once, in one write, and the replies, parsed by hiredis, go back to the callers in the order the commands went.

Why not redis-py's command path, which every other Redis call of mgpu uses: on this machine a round trip through
it costs the calling process 60-75 µs of CPU (the pool's checkout and release, the retry wrapper, the timeout
context, the parser reading a stream), through this one 25-30 µs, and the hot path makes one or two round trips
per request in each process (docs/benchmarks.md §10e: ``python -m bench.floors --redis-only``).  The connection
itself is still redis-py's: the client's own pool makes it and redis-py runs its handshake (the URL, the ACL user
and password, TLS, the database, the client's name; with a ``redis+sentinel://`` URL, the primary the sentinels
name), and only then does the pipe take its socket over.

What a caller sees is what a redis-py pipeline with ``raise_on_error=False`` gives: a list of replies, an error
reply as redis-py's exception (``NoScriptError``, ``ResponseError``, ...) in its place; a lost connection fails
every round trip in flight with ``redis.ConnectionError``, and one that gets no reply within the pool's socket
timeout with ``redis.TimeoutError`` (the socket is then dropped); the next call connects again.  A ``READONLY``
reply (a primary that became a replica in a failover) is a ``ConnectionError`` too, and drops the socket so that
the next connection asks the sentinels again, as redis-py's Sentinel connections do.  A caller cancelled while
its command is in flight leaves the command to run (its reply goes to nobody), unless the pipe is made with
``drop_on_cancel``: then the socket is dropped, as redis-py drops its connection, so that a blocking read ends
on the server instead of taking entries for a reader that has gone.

Not for a Redis Cluster (redis-py's cluster client routes each command to its slot's node): :meth:`RedisPipe.of`
gives ``None`` there, and the callers keep redis-py's path.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis._parsers.helpers import parse_stream_list


class _RoundTrip:
    __slots__ = ("expected", "future", "replies", "sent")

    def __init__(self, expected: int, future: asyncio.Future[list[Any]], sent: float) -> None:
        self.expected = expected
        self.future = future
        self.replies: list[Any] = []
        self.sent = sent


class _Protocol(asyncio.Protocol):
    """The socket's protocol once the pipe has it: replies to the round trips in flight, in order."""

    def __init__(self, transport: asyncio.Transport, on_lost: Any) -> None:
        self.transport = transport
        self.reader = hiredis.Reader(replyError=BaseParser.parse_error)  # error replies as redis-py's exceptions
        self.in_flight: collections.deque[_RoundTrip] = collections.deque()
        self.on_lost = on_lost
        self.failure: Exception | None = None  # why it was dropped, when the pipe dropped it
        self.writer: Any = None

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        in_flight = self.in_flight
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, hiredis.PushNotification):
                continue  # RESP3 pushes (e.g. a server's maintenance notices) answer no command of the pipe's
            if isinstance(reply, redis.exceptions.ReadOnlyError):
                self.drop(redis.ConnectionError(f"the primary became a replica ({reply})"))
                return
            rt = in_flight[0]
            rt.replies.append(reply)
            if len(rt.replies) == rt.expected:
                in_flight.popleft()
                if not rt.future.done():  # its caller may have been cancelled
                    rt.future.set_result(rt.replies)

    def drop(self, why: Exception) -> None:
        """Fail every round trip in flight with ``why`` and close the socket."""
        self.failure = why
        self.on_lost(self)  # the next call connects anew, even before the loop reports the socket closed
        self._fail(why)
        self.transport.abort()

    def _fail(self, why: Exception) -> None:
        while self.in_flight:
            rt = self.in_flight.popleft()
            if not rt.future.done():
                rt.future.set_exception(why)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(self)
        self._fail(self.failure or redis.ConnectionError(
            f"Redis connection lost: {exc}" if exc else "Redis closed the connection"))


class RedisPipe:
    def __init__(self, pool: aioredis.ConnectionPool, *, drop_on_cancel: bool = False) -> None:
        """``drop_on_cancel``: a caller cancelled before its reply drops the socket, so that Redis ends what the
        command still does (a blocking XREADGROUP would otherwise take entries for a reader that has gone, as
        redis-py's own path does by closing its connection); for a pipe that one task uses for blocking reads."""
        self.pool = pool
        self.drop_on_cancel = drop_on_cancel
        self.timeout_s = float(pool.connection_kwargs.get("socket_timeout") or 5.0)
        self._proto: _Protocol | None = None
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    @classmethod
    def of(cls, client: Any, *, drop_on_cancel: bool = False) -> RedisPipe | None:
        """A pipe on ``client``'s pool; ``None`` for a client that is not redis-py's asyncio client over a socket
        (a cluster client; fakeredis)."""
        pool = getattr(client, "connection_pool", None)
        if type(client) is not aioredis.Redis or pool is None:
            return None
        if not issubclass(pool.connection_class, (aioredis.Connection, aioredis.UnixDomainSocketConnection)):
            return None
        return cls(pool, drop_on_cancel=drop_on_cancel)

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one write and return their replies (an error reply as its exception)."""
        if self.closed:
            raise redis.ConnectionError("the pipe is closed")
        proto = self._proto or await self._connect()
        loop = asyncio.get_running_loop()
        data = hiredis.pack_command(tuple(commands[0])) if len(commands) == 1 else b"".join(
            [hiredis.pack_command(tuple(c)) for c in commands])
        rt = _RoundTrip(len(commands), loop.create_future(), loop.time())
        proto.in_flight.append(rt)
        if self._timer is None:
            self._timer = loop.call_later(self.timeout_s, self._watch)
        try:
            proto.transport.write(data)
        except Exception as exc:  # a transport closed under the pipe (uvloop raises here): start again
            proto.drop(redis.ConnectionError(f"Redis connection lost: {exc!r}"))
        try:
            return await rt.future
        except asyncio.CancelledError:
            if self.drop_on_cancel and rt in proto.in_flight:  # its reply has not come: Redis is still at it
                proto.drop(redis.ConnectionError("a blocking read was cancelled"))
            raise

    async def call(self, *command: Any) -> Any:
        """One command's reply; an error reply raised."""
        (reply,) = await self.execute([command])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _connect(self) -> _Protocol:
        async with self._lock:
            if self._proto is not None:
                return self._proto
            if self.closed:
                raise redis.ConnectionError("the pipe is closed")
            conn = self.pool.make_connection()
            await conn.connect()  # redis-py's handshake: TLS, AUTH, SELECT, CLIENT SETNAME; Sentinel's primary
            writer = conn._writer
            conn._reader = conn._writer = None  # the socket is the pipe's now (redis-py would close it when collected)
            transport = writer.transport
            proto = _Protocol(transport, self._lost)  # type: ignore[arg-type]
            proto.writer = writer  # held: asyncio's StreamWriter closes its transport when it is collected
            transport.set_protocol(proto)
            if self.closed or transport.is_closing():  # closed while redis-py's handshake ended: its loss went
                transport.abort()                       # to redis-py's protocol, not to this one
                raise redis.ConnectionError("the pipe is closed" if self.closed else "Redis closed the connection")
            self._proto = proto
            return proto

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None

    def _watch(self) -> None:
        """A round trip without its reply for ``timeout_s``: drop the socket (every caller in flight learns it)."""
        self._timer = None
        proto = self._proto
        if proto is None or not proto.in_flight:
            return
        loop = asyncio.get_running_loop()
        waited = loop.time() - proto.in_flight[0].sent
        if waited >= self.timeout_s:
            proto.drop(redis.TimeoutError(f"no reply from Redis in {self.timeout_s:g} s"))
        else:
            self._timer = loop.call_later(self.timeout_s - waited, self._watch)

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._proto is not None:
            self._proto.drop(redis.ConnectionError("the pipe is closed"))


StreamReply = list[list[Any]]  # [[stream, [(id, fields), ...]], ...]


def stream_entries(reply: Any) -> StreamReply:
    """An XREAD or XREADGROUP reply as redis-py's client gives it (its own ``parse_stream_list``):
    ``[[stream, [(id, fields), ...]], ...]``, ``[]`` for a read that timed out.  The reply is a map where the
    connection speaks RESP3 (redis-py's handshake asks for it), a list of pairs in RESP2."""
    pairs = reply.items() if isinstance(reply, dict) else reply or ()
    return [[stream, parse_stream_list(entries)] for stream, entries in pairs]
