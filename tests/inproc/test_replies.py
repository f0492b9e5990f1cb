"""The gateway's reply reader (gateway/replies.py) on a real redis-server."""

from __future__ import annotations

import asyncio
import uuid

from common.keys import Keys
from common.records import ReplyKind
from common.redis_conn import make_client
from gateway.replies import ReplyRouter
from ops.procs import RedisServer


async def test_a_reply_added_before_the_reader_first_reads_reaches_its_waiter(redis_server: RedisServer) -> None:
    """A process that has just started accepts a request, and a fast worker answers it, before the reader task
    has run (CI saw such a request hang in a two-process gateway): the reader must not begin past that reply."""
    keys = Keys("t" + uuid.uuid4().hex[:8])
    r = make_client(redis_server.url)
    router = ReplyRouter(r, keys, "gw-1", block_ms=100)
    w = router.register("req-1", False, "m")
    await r.xadd(router.stream, {"r": "req-1", "k": ReplyKind.FINAL.value, "p": b'{"id": "req-1"}'})
    await r.xadd(router.stream, {"r": "someone-else", "k": ReplyKind.FINAL.value, "p": b"{}"})  # no waiter: skipped
    reader = asyncio.create_task(router.run())
    try:
        kind, payload = await asyncio.wait_for(w.future, 10)
        assert (kind, payload) == (ReplyKind.FINAL, b'{"id": "req-1"}')
        assert router.healthy
    finally:
        router.closed = True
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await r.aclose()
