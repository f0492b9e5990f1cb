"""The hot path's pipelined connection (common.redis_pipe) against a real redis-server: replies go back to the
right callers in order, error replies become redis-py's exceptions in their place, redis-py's handshake (ACL user,
client name) is the connection's, and a lost, silent or demoted server fails the round trips in flight and is
connected to again on the next call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common.redis_conn import make_client
from common.redis_pipe import RedisPipe, stream_entries
from ops.procs import RedisServer, free_port


@contextlib.asynccontextmanager
async def piped(url: str, *, name: str | None = None, drop_on_cancel: bool = False
                ) -> AsyncIterator[tuple[redis.asyncio.Redis, RedisPipe]]:
    """mgpu's pooled client of ``url`` and a pipe on its pool; both closed after."""
    client = make_client(url, name=name)
    pipe = RedisPipe.of(client, drop_on_cancel=drop_on_cancel)
    assert pipe is not None
    try:
        yield client, pipe
    finally:
        pipe.close()
        await client.aclose()


async def test_concurrent_callers_get_their_own_replies_and_errors_in_place(redis_server: RedisServer) -> None:
    async with piped(redis_server.url, name="piped") as (client, pipe):
        await client.set("s", "x")
        outs = await asyncio.gather(*(pipe.execute([("INCR", f"n{i % 7}"), ("GET", "s")]) for i in range(200)))
        assert sorted(o[0] for o in outs) == sorted(k + 1 for i in range(7) for k in range(len(range(i, 200, 7))))
        assert all(o[1] == b"x" for o in outs)
        got = await pipe.execute([("EVALSHA", "0" * 40, 0), ("INCR", "s"), ("CLIENT", "GETNAME"), ("PING",)])
        assert isinstance(got[0], redis.exceptions.NoScriptError)
        assert isinstance(got[1], redis.ResponseError) and "not an integer" in str(got[1])
        assert got[2:] == [b"piped", b"PONG"]  # redis-py's handshake named the connection


async def test_an_acl_users_connection_and_its_refusals(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path, port=free_port(), password="pw",
                      acl=["user app on >apppw ~app:* +@all -flushall"]).start()
    try:
        async with piped(srv.url_for("app", "apppw")) as (_client, pipe):
            out = await pipe.execute([("ACL", "WHOAMI"), ("SET", "app:k", "v"), ("SET", "other", "v")])
            assert out[:2] == [b"app", b"OK"]
            assert isinstance(out[2], redis.exceptions.NoPermissionError)
    finally:
        srv.stop()


async def test_a_killed_server_fails_the_round_trips_in_flight_and_the_next_call_connects_again(
        redis_server: RedisServer) -> None:
    async with piped(redis_server.url) as (client, pipe):
        assert await pipe.execute([("PING",)]) == [b"PONG"]
        blocked = asyncio.create_task(pipe.execute([("BLPOP", "never", 0)]))
        while int((await client.info("clients"))["blocked_clients"]) < 1:
            await asyncio.sleep(0.01)  # polling Redis's own count: no event to await from another client
        redis_server.kill()
        with pytest.raises(redis.ConnectionError):
            await blocked
        with pytest.raises(redis.ConnectionError):  # down: the connect fails, as redis-py's would
            await pipe.execute([("PING",)])
        redis_server.start()
        assert await pipe.execute([("SET", "k", "v"), ("GET", "k")]) == [b"OK", b"v"]


async def test_a_round_trip_without_a_reply_times_out_and_a_cancelled_callers_reply_goes_to_nobody(
        redis_server: RedisServer) -> None:
    async with piped(redis_server.url) as (client, pipe):
        pipe.timeout_s = 0.3
        with pytest.raises(redis.TimeoutError):
            await pipe.execute([("BLPOP", "never", 0)])
        assert await pipe.execute([("PING",)]) == [b"PONG"]  # a new socket
        pipe.timeout_s = 30.0
        cancelled = asyncio.create_task(pipe.execute([("BLPOP", "q", 0)]))
        while int((await client.info("clients"))["blocked_clients"]) < 1:
            await asyncio.sleep(0.01)
        cancelled.cancel()
        await client.set("a", "mine")
        after = asyncio.create_task(pipe.execute([("GET", "a")]))  # queued behind the BLPOP on the server
        await client.rpush("q", "its")
        assert await after == [b"mine"]  # not the BLPOP's reply
        assert cancelled.cancelled()


async def test_a_demoted_primary_is_a_connection_error_and_the_socket_is_dropped(redis_server: RedisServer) -> None:
    async with piped(redis_server.url) as (client, pipe):
        await client.replicaof("127.0.0.1", free_port())  # nobody there: it stays a read-only replica
        with pytest.raises(redis.ConnectionError, match="replica"):
            await pipe.execute([("SET", "k", "v")])
        await client.replicaof("NO", "ONE")
        assert await pipe.execute([("SET", "k", "v")]) == [b"OK"]
        with pytest.raises(redis.ConnectionError):
            pipe.close()
            await pipe.execute([("PING",)])


def test_no_pipe_for_a_cluster_client_or_fakeredis() -> None:
    import fakeredis
    import redis.asyncio.cluster as aiocluster

    assert RedisPipe.of(fakeredis.FakeAsyncRedis()) is None
    assert RedisPipe.of(aiocluster.RedisCluster.__new__(aiocluster.RedisCluster)) is None


async def test_stream_reads_come_back_as_redis_py_gives_them(redis_server: RedisServer) -> None:
    async with piped(redis_server.url) as (client, pipe):
        eid = await client.xadd("s", {"a": "1", "b": "2"})
        await client.xadd("t", {"c": "3"})
        await client.xgroup_create("s", "g", id="0")
        want = await client.xread({"s": "0", "t": "0"})
        assert stream_entries(await pipe.call("XREAD", "STREAMS", "s", "t", "0", "0")) == want
        assert stream_entries(await pipe.call("XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">")) == [
            [b"s", [(eid, {b"a": b"1", b"b": b"2"})]]]
        await client.xdel("s", eid)  # deleted while pending: no fields
        assert stream_entries(await pipe.call("XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", "0")) == [
            [b"s", [(eid, {})]]] == await client.xreadgroup("g", "c", {"s": "0"})
        assert stream_entries(await pipe.call("XREAD", "BLOCK", 10, "STREAMS", "s", "$")) == []


async def test_resp3_pushes_between_replies_answer_nobody() -> None:
    from common.redis_pipe import _Protocol, _RoundTrip

    class Transport:
        def abort(self) -> None:
            raise AssertionError("not dropped")

    proto = _Protocol(Transport(), lambda _p: None)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    first, second = (_RoundTrip(n, loop.create_future(), 0.0) for n in (2, 1))
    proto.in_flight.extend([first, second])
    proto.data_received(b"+OK\r\n>2\r\n$10\r\ninvalidate\r\n*0\r\n:7")  # a push between two replies, a split one
    proto.data_received(b"\r\n$1\r\nx\r\n")
    assert await first.future == [b"OK", 7]
    assert await second.future == [b"x"]


async def test_a_cancelled_blocking_read_takes_nothing_afterwards(redis_server: RedisServer) -> None:
    async with piped(redis_server.url, drop_on_cancel=True) as (client, pipe):
        await client.xgroup_create("s", "g", id="$", mkstream=True)
        read = asyncio.create_task(pipe.call("XREADGROUP", "GROUP", "g", "w1", "BLOCK", 30000, "STREAMS", "s", ">"))
        while int((await client.info("clients"))["blocked_clients"]) < 1:
            await asyncio.sleep(0.01)
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        while int((await client.info("clients"))["blocked_clients"]) > 0:
            await asyncio.sleep(0.01)  # the dropped socket's read ends on the server
        await client.xadd("s", {"p": "x"})
        assert (await client.xpending("s", "g"))["pending"] == 0  # nobody took it: the next reader will
        assert stream_entries(await pipe.call("XREADGROUP", "GROUP", "g", "w2", "STREAMS", "s", ">"))[0][1][0][1] == {
            b"p": b"x"}


async def test_errors_inside_an_array_reply_are_redis_py_exceptions(redis_server: RedisServer) -> None:
    async with piped(redis_server.url) as (_client, pipe):
        one, boom = await pipe.call("EVAL", "return {1, redis.error_reply('ERR boom')}", 0)
        assert one == 1 and isinstance(boom, redis.ResponseError) and "boom" in str(boom)


async def test_a_socket_closed_as_the_handshake_ends_is_a_connection_error_and_the_next_call_works(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    first = [True]

    def make() -> Any:
        conn = made()
        handshake = conn.connect

        async def connect() -> None:
            await handshake()
            if first[0]:  # the peer resets the socket just after redis-py's handshake
                first[0] = False
                conn._writer.transport.abort()
                await asyncio.sleep(0)  # the loop tells redis-py's protocol, not the pipe's

        conn.connect = connect
        return conn

    async with piped(redis_server.url) as (_client, pipe):
        made = pipe.pool.make_connection
        monkeypatch.setattr(pipe.pool, "make_connection", make)
        with pytest.raises(redis.ConnectionError):
            await pipe.execute([("PING",)])
        assert await pipe.execute([("PING",)]) == [b"PONG"]
