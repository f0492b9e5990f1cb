"""What a worker runs a request on: an OpenAI-compatible server, in the worker's process, without a
socket.  The worker hands it a :class:`Call` (the request body as the client sent it, and what earlier
attempts of the same stream already sent) and relays what it answers through Redis, byte for byte:

    serve(call)  ->  Piece*  ->  Reply

* a :class:`Piece` is part of a stream, as the client gets it (server-sent events), with the token
  ids those events carry (so that another worker can continue the stream if this one dies);
* the :class:`Reply` ends every call: a JSON body and its status, or an error, and the usage.

Two servers implement :class:`OpenAIServer`: :mod:`gpu_worker.serving.vllm` (vLLM's own OpenAI
layer over its engine: what ``vllm serve`` answers, by construction) and :mod:`gpu_worker.serving.sim`
(mgpu's OpenAI layer over the simulator).  A stream that earlier attempts began continues after what
they sent (:class:`Resumed`), or, where it cannot, ends with :func:`not_continued`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import orjson

from common.errors import StreamInterrupted
from common.schemas import ErrorInfo, Kind, Usage, WorkItem


@dataclass
class ModelCard:
    """One name a server answers to (its model, or a LoRA adapter), with its facts."""

    id: str
    max_model_len: int
    root: str = ""  # the model folder
    parent: str | None = None  # the base model of an adapter
    kinds: tuple[Kind, ...] = ("chat", "completion", "tokenize", "detokenize")  # endpoints it serves
    tokenizer: str = ""  # how the gateway counts prompt tokens: "sim", a model folder, or ""
    owned_by: str = "mgpu"


def sse_events(sse: str) -> list[str]:
    """The events of a server-sent event text, without their blank line."""
    return [e for e in sse.split("\n\n") if e]


def event_json(event: str) -> dict[str, Any] | None:
    """The JSON object of a ``data: {...}`` event, else None (a comment, ``[DONE]``, another field)."""
    if not event.startswith("data: {"):
        return None
    try:
        obj = orjson.loads(event[6:])
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


@dataclass
class Resumed:
    """What earlier attempts of a stream sent, read back from its chunk stream."""

    seq: int  # the last chunk's sequence number
    sse: str  # every event sent, in order
    tokens: dict[int, list[int]] | None  # per choice, the token ids behind them; None: not continuable

    @property
    def events(self) -> list[dict[str, Any]]:
        return [obj for e in sse_events(self.sse) if (obj := event_json(e)) is not None]

    def texts(self, kind: Kind) -> dict[int, str]:
        """Per choice, the text sent (chat: ``delta.content``; completion: ``text``)."""
        out: dict[int, str] = {}
        for obj in self.events:
            for c in obj.get("choices") or ():
                piece = (c.get("delta") or {}).get("content") if kind == "chat" else c.get("text")
                if isinstance(piece, str):
                    out[c.get("index", 0)] = out.get(c.get("index", 0), "") + piece
        return out

    def finished(self) -> dict[int, str]:
        """Per choice, the finish reason sent, if any."""
        return {c.get("index", 0): c["finish_reason"] for obj in self.events for c in obj.get("choices") or ()
                if c.get("finish_reason")}

    @property
    def done(self) -> bool:
        """The stream's end was sent already (only its result is missing)."""
        return "data: [DONE]" in sse_events(self.sse)


@dataclass
class Call:
    """One attempt at one request."""

    item: WorkItem
    attempt_id: str  # unique per delivery: the engine's id for the sequences of this attempt
    resumed: Resumed | None = None  # a stream that earlier attempts began (chunks were sent)
    on_tokens: Callable[[int, int, int], None] = lambda choice, tokens, prompt_tokens: None  # per engine step


@dataclass
class Piece:
    """Part of a stream: server-sent events as the client gets them."""

    sse: str
    tokens: dict[int, list[int]] | None = None  # per choice; None: this stream cannot be continued


@dataclass
class Reply:
    """The end of a call."""

    status: int = 200
    body: dict[str, Any] | None = None  # a JSON response (None for a stream)
    error: ErrorInfo | None = None
    usage: Usage = field(default_factory=Usage)


@runtime_checkable
class OpenAIServer(Protocol):
    name: str  # the engine: "vllm" | "sim"

    @property
    def slots(self) -> int:
        """Sequences the engine runs at once."""
        ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def aborts(self) -> int:
        """Sequences aborted before they finished (a counter, for metrics)."""
        ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def check_health(self) -> None:
        """Return if healthy; raise :class:`common.errors.EngineDead` otherwise."""
        ...

    def models(self) -> list[ModelCard]:
        """The names this server answers to (after start)."""
        ...

    def serve(self, call: Call) -> AsyncGenerator[Piece | Reply, None]:
        """Answer ``call``: pieces of a stream, then one Reply, last.  Closing the generator early
        (a cancel, a deadline, a drain) aborts what the engine runs for it."""
        ...


def not_continued(why: str) -> Reply:
    """The Reply of a stream that another worker began and that cannot be continued here: the client got
    part of it already, so it is not started again either; it ends with an explicit error."""
    err = StreamInterrupted(f"the worker streaming this response stopped after part of it was sent, and {why}: "
                            "send the request again")
    return Reply(status=err.status, error=err.to_info())


def error_reply(info: ErrorInfo) -> Reply:
    return Reply(status=info.status, error=info)


def usage_of(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)
