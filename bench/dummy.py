"""A trivial OpenAI-like HTTP/1.1 server (``mgpu bench --serve-dummy HOST:PORT``) for measuring the
load generator's own ceiling and cost: ``/v1/chat/completions`` and ``/v1/completions``, JSON or SSE,
``max_tokens`` one-word tokens, instantly or paced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import orjson


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
