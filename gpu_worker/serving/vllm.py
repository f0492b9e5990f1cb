"""vLLM's own OpenAI server in the worker's process: the answers of ``vllm serve``, by construction.

The worker builds what ``vllm serve`` builds, from the same flags (vLLM's own argument parser, so every
``vllm serve`` option is there: ``mgpu worker ... -- --tool-call-parser hermes --enable-lora ...``): the
engine (``AsyncLLM``), vLLM's FastAPI app and its serving state (``init_app_state``: the protocol models,
the chat, completion, embedding, tokenization and responses serving classes, the tool-call and reasoning
parsers, chat templates, LoRA adapters).  A request is one in-process ASGI call of that app, with the
request body as the client sent it; what the app answers (a JSON body and its status, or server-sent
events) is relayed to the gateway byte for byte.  The response id is mgpu's: the rest of it goes to
vLLM as ``X-Request-Id``.  A cancel, a deadline or a drain cancels the call, and vLLM aborts the
sequence in the engine.  No socket, no second process besides vLLM's own engine core.

Between the app and the engine sits :class:`_EngineTap`: it counts what the engine generates (usage of a
stream, token metrics, aborts) and, for a stream that another worker began, continues it: the prompt
becomes "prompt + the token ids already sent", ``max_tokens`` shrinks by as many, and the app's events
are mended (no second role chunk, the original ``created``, usage that counts the earlier tokens).
Only plain-text streams with one choice can continue (:func:`why_not_continuable`); others end with an
explicit error if their worker dies after their first byte (docs/architecture.md).

vLLM starts its engine core in a new (spawned) process: a script that builds this server needs an
``if __name__ == "__main__":`` guard.  vLLM is imported lazily, so this module imports cheaply.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from argparse import Namespace
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from common.errors import EngineDead, GenerationFailed
from common.schemas import ErrorInfo, Kind, Usage, WorkItem, base_request_id
from common.settings import WorkerSettings
from gpu_worker.serving.base import (
    Call,
    ModelCard,
    Piece,
    Reply,
    Resumed,
    error_reply,
    event_json,
    not_continued,
    sse_events,
    usage_of,
)

log = logging.getLogger("mgpu.worker.vllm")

_DISCONNECT_GRACE_S = 5.0  # how long vLLM's app may take to abort a call closed early, before it is cancelled
_RESERVED = {"--model": "--model-path", "--served-model-name": "--model"}  # mgpu's own settings name these
_KINDS: dict[str, tuple[Kind, ...]] = {"generate": ("chat", "completion", "responses", "tokenize", "detokenize"),
                                       "embed": ("embedding", "tokenize", "detokenize")}


def engine_argv(s: WorkerSettings, model_path: str) -> list[str]:
    """The ``vllm serve`` arguments of this worker: mgpu's settings first, then the engine flags given
    after ``--`` (which win, as a later flag does)."""
    for flag in s.engine_args:
        name = flag.split("=", 1)[0]
        if name in _RESERVED:
            raise ValueError(f"engine flag {name}: give it as mgpu's {_RESERVED[name]} instead")
    argv = ["--model", model_path, "--served-model-name", s.model, "--max-model-len", str(s.max_model_len),
            "--max-num-seqs", str(s.slots), "--gpu-memory-utilization", str(s.vllm_gpu_memory_utilization),
            "--dtype", s.vllm_dtype]
    if s.vllm_enforce_eager:
        argv.append("--enforce-eager")
    return argv + list(s.engine_args)


def parse_engine_args(argv: list[str]) -> Namespace:
    """``argv`` read by ``vllm serve``'s own parser and checks (a bad flag: SystemExit/ValueError, as there)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser(prog="mgpu worker --")).parse_args(argv)
    validate_parsed_serve_args(args)
    args.sse_keep_alive_interval = 0  # the gateway keeps streams alive (its setting); events pass one by one
    return args


def why_not_continuable(item: WorkItem, args: Namespace) -> str | None:
    """Why another worker could not continue this stream after its first byte (None: it can)."""
    b = item.body
    reasons = [
        (item.kind not in ("chat", "completion"), f"a {item.kind} stream"),
        (item.n != 1 or b.get("best_of") not in (None, 1) or b.get("use_beam_search"), "a stream of several choices"),
        (bool(b.get("tools")) and b.get("tool_choice") != "none", "a stream with tools (the tool-call parser's state)"),
        ((b.get("response_format") or {}).get("type", "text") != "text" if isinstance(b.get("response_format"), dict)
         else b.get("response_format") is not None, "a structured-output stream"),
        (any(b.get(k) is not None for k in ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                                            "guided_grammar")), "a structured-output stream"),
        (bool(getattr(args.structured_outputs_config, "reasoning_parser", None)),
         "a stream through the reasoning parser"),
        (bool(b.get("echo")) or b.get("prompt_logprobs") is not None, "an echo or prompt-logprobs stream"),
        (isinstance(b.get("prompt"), list) and len(b["prompt"]) > 1 and not isinstance(b["prompt"][0], int),
         "a stream of several prompts"),
    ]
    return next((why for bad, why in reasons if bad), None)


@dataclass
class _Tap:
    """What the engine did for one attempt: tokens since the last look, usage, and a continuation."""

    key: str  # the serving layer's engine request id (a suffix ``_i`` for several prompts)
    prior: list[int] = field(default_factory=list)  # continue after these token ids (a resumed stream)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    new: dict[int, list[int]] = field(default_factory=dict)
    on_tokens: Any = None
    running: set[str] = field(default_factory=set)  # engine requests started and not finished

    def take(self) -> dict[int, list[int]]:
        out, self.new = self.new, {}
        return out


class _EngineTap:
    """The engine as vLLM's serving classes see it: ``generate`` watched (and continued), all else the engine's."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.taps: dict[str, _Tap] = {}
        self.aborts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _tap(self, request_id: str) -> _Tap | None:
        tap = self.taps.get(request_id)
        if tap is None:
            tap = next((t for k, t in self.taps.items() if request_id.startswith(k + "_")), None)
        return tap

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                       **kw: Any) -> AsyncGenerator[Any, None]:
        tap = self._tap(request_id)
        original: list[int] | None = None
        if tap is not None and tap.prior and isinstance(prompt, dict) and prompt.get("type") == "token":
            original = list(prompt["prompt_token_ids"])
            prompt = {**prompt, "prompt_token_ids": original + tap.prior}
            sampling_params = sampling_params.clone()
            if sampling_params.max_tokens is not None:
                sampling_params.max_tokens -= len(tap.prior)
            if getattr(sampling_params, "min_tokens", 0):
                sampling_params.min_tokens = max(0, sampling_params.min_tokens - len(tap.prior))
        finished = False
        counted = False
        if tap is not None:
            tap.running.add(request_id)
        try:
            async for out in self._engine.generate(prompt, sampling_params, request_id, **kw):
                if original is not None:
                    out.prompt_token_ids = original
                if tap is not None:
                    if not counted and out.prompt_token_ids is not None:
                        tap.prompt_tokens += len(out.prompt_token_ids)
                        counted = True
                    for o in out.outputs:
                        n = len(o.token_ids)
                        tap.completion_tokens += n
                        tap.new.setdefault(o.index, []).extend(o.token_ids)
                        if tap.on_tokens is not None:
                            tap.on_tokens(o.index, n, len(out.prompt_token_ids or ()))
                finished = out.finished
                yield out
        finally:
            if tap is None:
                if not finished:
                    self.aborts += 1
            elif request_id in tap.running:  # (not aborted by abort_open already)
                tap.running.discard(request_id)
                if not finished:
                    self.aborts += 1

    async def abort_open(self, tap: _Tap) -> None:
        """Abort what a call closed early still runs in the engine.  vLLM's app drops a stream's generator
        when its client leaves between two outputs, and the engine would go on until the generator is
        collected: the sequence is aborted now instead."""
        ids, tap.running = list(tap.running), set()
        if ids:
            self.aborts += len(ids)
            await self._engine.abort(ids)


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Imports that must not change the root logger: vLLM's app imports ``model_hosting_container_standards``,
    which sets the root logger and its handlers to ERROR when first imported (every mgpu INFO line would
    vanish)."""
    root = logging.getLogger()
    level, handlers = root.level, [(h, h.level) for h in root.handlers]
    try:
        yield
    finally:
        root.setLevel(level)
        for h, lvl in handlers:
            h.setLevel(lvl)


def _error_info(status: int, body: bytes) -> ErrorInfo:
    """vLLM's error body (``{"error": {...}}``, or FastAPI's ``{"detail": ...}``) as an ErrorInfo."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return ErrorInfo(message=str(err.get("message") or ""), type=str(err.get("type") or "server_error"),
                         param=err.get("param") if isinstance(err.get("param"), str) else None, status=status)
    detail = obj.get("detail") if isinstance(obj, dict) else None
    return ErrorInfo(message=str(detail or body[:200].decode(errors="replace")),
                     type="NotFoundError" if status == 404 else "server_error", status=status)


class _Mend:
    """Mends the events of a continued stream: no second role chunk, the first attempt's ``created``,
    usage that counts the tokens generated before."""

    def __init__(self, resumed: Resumed, prior: int) -> None:
        first = next(iter(resumed.events), {})
        self.created = first.get("created")
        self.prior = prior

    def __call__(self, sse: str) -> str:
        out = []
        for event in sse_events(sse):
            obj = event_json(event)
            if obj is None:
                out.append(event)
                continue
            choices = obj.get("choices") or []
            if any("role" in (c.get("delta") or {}) and not (c.get("delta") or {}).get("content")
                   for c in choices):
                continue
            if self.created is not None:
                obj["created"] = self.created
            usage = obj.get("usage")
            if isinstance(usage, dict):
                usage["completion_tokens"] = (usage.get("completion_tokens") or 0) + self.prior
                usage["total_tokens"] = (usage.get("total_tokens") or 0) + self.prior
            out.append("data: " + orjson.dumps(obj).decode())
        return "".join(e + "\n\n" for e in out)


class VllmServer:
    """The :class:`gpu_worker.serving.base.OpenAIServer` of a vLLM engine."""

    name = "vllm"

    def __init__(self, settings: WorkerSettings, model_path: str) -> None:
        self.s = settings
        self.model_path = model_path
        self.argv = engine_argv(settings, model_path)
        self.args = parse_engine_args(self.argv)
        self.slots = int(self.args.max_num_seqs or settings.slots)
        self.max_model_len = int(self.args.max_model_len or settings.max_model_len)
        self._engine: Any = None
        self._tap: _EngineTap | None = None
        self._app: Any = None
        self._cards: list[ModelCard] = []
        self._tokenizer: Any = None
        self._closed = False

    @property
    def aborts(self) -> int:
        return self._tap.aborts if self._tap is not None else 0

    @property
    def load(self) -> int:
        return self._engine.get_num_unfinished_requests() if self._engine is not None else 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Build the engine (in a thread: the model loads for seconds to minutes while the event loop keeps
        heartbeating), then vLLM's app and serving state over it."""
        if self._engine is not None:
            return
        if self._closed:
            raise EngineDead("the vLLM engine was shut down")
        # The engine travels in a list: vLLM keeps tracebacks of imports it does while building (so the
        # thread's frames stay alive), and shutdown() must be able to drop the last reference to it.
        box: list[Any] = []
        fut = asyncio.ensure_future(asyncio.to_thread(self._build, box))
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(lambda _: [engine.shutdown() for engine in box])
            raise
        self._engine = box.pop()
        await self._init_app()
        log.info("vLLM server ready: model=%s slots=%d max_model_len=%d served=%s", self.model_path, self.slots,
                 self.max_model_len, [c.id for c in self._cards])

    def _build(self, box: list[Any]) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.is_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.s.vllm_kv_cache_gb)  # GiB of RAM for the KV cache
        engine_args = AsyncEngineArgs.from_cli_args(self.args)
        config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        box.append(AsyncLLM.from_vllm_config(
            vllm_config=config, usage_context=UsageContext.OPENAI_API_SERVER,
            enable_log_requests=engine_args.enable_log_requests, disable_log_stats=engine_args.disable_log_stats,
            aggregate_engine_logging=engine_args.aggregate_engine_logging))

    async def _init_app(self) -> None:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        engine = self._engine
        await engine.reset_mm_cache()
        tasks = await engine.get_supported_tasks()
        self._tap = _EngineTap(engine)
        with _root_logging_kept():
            app = build_app(self.args, tasks, engine.model_config)
            await init_app_state(self._tap, app.state, self.args, tasks)
        self._app = app
        self.max_model_len = int(engine.model_config.max_model_len)
        self._tokenizer = engine.get_tokenizer() if "generate" in tasks else None
        kinds = tuple(dict.fromkeys(k for t in tasks for k in _KINDS.get(t, ())))
        listed = await app.state.openai_serving_models.show_available_models()
        tokenizer = self.args.tokenizer or self.model_path
        self._cards = [ModelCard(id=c.id, max_model_len=c.max_model_len or self.max_model_len, root=c.root or "",
                                 parent=c.parent, kinds=kinds, tokenizer=tokenizer if c.parent is None else "",
                                 owned_by=c.owned_by) for c in listed.data]

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        self._closed = True
        self._app = self._tap = None
        if engine is not None:
            engine.shutdown()
            del engine
            gc.collect()  # AsyncLLM sits in reference cycles: finalize it now, not at interpreter exit

    async def check_health(self) -> None:
        engine = self._engine
        if engine is None:
            raise EngineDead("the vLLM engine is not running")
        try:
            await engine.check_health()
        except Exception as exc:
            raise EngineDead(f"the vLLM engine is dead: {exc}") from exc

    def models(self) -> list[ModelCard]:
        return list(self._cards)

    # ------------------------------------------------------------------ requests
    async def serve(self, call: Call) -> AsyncGenerator[Piece | Reply, None]:
        if self._app is None or self._tap is None:
            raise EngineDead("the vLLM engine is not running")
        item = call.item
        prefix = {"chat": "chatcmpl-", "completion": "cmpl-", "embedding": "embd-"}.get(item.kind, "")
        tap = _Tap(key=prefix + base_request_id(item.kind, item.id), on_tokens=call.on_tokens)
        continuable = item.stream and why_not_continuable(item, self.args) is None
        mend = None
        resumed = call.resumed
        if resumed is not None:
            why = why_not_continuable(item, self.args) or ("its tokens were not recorded" if resumed.tokens is None
                                                           else None)
            if why is not None:
                yield not_continued(f"{why} cannot be continued on another worker")
                return
            assert resumed.tokens is not None
            tap.prior = list(resumed.tokens.get(0, []))
            head = self._unsent(item, resumed, tap.prior)
            if head is None:
                yield not_continued("its text could not be matched with its tokens, so it")
                return
            if resumed.done:
                yield Reply(usage=usage_of(0, len(tap.prior)))
                return
            if head:
                yield Piece(head, {0: []})
            mend = _Mend(resumed, len(tap.prior))
        self._tap.taps[tap.key] = tap
        try:  # closed explicitly when this generator is closed early (an async for alone would leave it open)
            async with contextlib.aclosing(self._relay(call, tap, continuable, mend)) as outs:
                async for out in outs:
                    yield out
        finally:
            self._tap.taps.pop(tap.key, None)

    def _unsent(self, item: WorkItem, resumed: Resumed, prior: list[int]) -> str | None:
        """The events for the text of ``prior`` that the client has not got ("" when none), or None when
        the text sent is not what ``prior`` decodes to."""
        sent = resumed.texts(item.kind).get(0, "")
        full = self._tokenizer.decode(prior, skip_special_tokens=item.body.get("skip_special_tokens", True))
        if not full.startswith(sent):
            return None
        rest = full[len(sent):]
        if not rest:
            return ""
        first = next(iter(resumed.events), {})
        choice = ({"index": 0, "delta": {"content": rest}, "logprobs": None, "finish_reason": None}
                  if item.kind == "chat" else {"index": 0, "text": rest, "logprobs": None, "finish_reason": None})
        obj = {"id": item.id, "object": first.get("object", "chat.completion.chunk" if item.kind == "chat"
                                                  else "text_completion"),
               "created": first.get("created", item.created), "model": first.get("model", item.model),
               "choices": [choice]}
        return "data: " + orjson.dumps(obj).decode() + "\n\n"

    async def _relay(self, call: Call, tap: _Tap, continuable: bool, mend: _Mend | None
                     ) -> AsyncGenerator[Piece | Reply, None]:
        """One in-process ASGI call of vLLM's app; its answer as Pieces (events) or a Reply (JSON)."""
        item = call.item
        body = orjson.dumps(item.body)
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": item.path, "raw_path": item.path.encode(),
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 0), "server": ("mgpu-worker", 0),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                             (b"x-request-id", base_request_id(item.kind, item.id).encode())]}
        events: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()
        gone = asyncio.Event()  # the call was closed early: the "client" disconnects
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # vLLM's handlers cancel themselves (and abort in the engine) on a disconnect
            return {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                ctype = dict(msg.get("headers") or ()).get(b"content-type", b"")
                events.put_nowait(("start", int(msg["status"]), ctype.startswith(b"text/event-stream")))
            elif msg["type"] == "http.response.body" and (msg.get("body") or not msg.get("more_body", False)):
                # the tokens behind these events, taken now: the engine may run ahead of the relay
                events.put_nowait(("body", bytes(msg.get("body") or b""), tap.take() if continuable else None))

        task = asyncio.create_task(self._app(scope, receive, send), name=f"vllm-{item.id}")
        try:
            async with contextlib.aclosing(self._answer(task, events, tap, mend, continuable)) as outs:
                async for out in outs:
                    yield out
        finally:
            if not task.done():  # closed early: a disconnect, as vllm serve sees one; cancelled if it lingers
                gone.set()
                await asyncio.wait({task}, timeout=_DISCONNECT_GRACE_S)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if tap.running and self._tap is not None:
                await self._tap.abort_open(tap)

    async def _answer(self, task: asyncio.Task[None], events: asyncio.Queue[tuple[str, Any, Any]], tap: _Tap,
                      mend: _Mend | None, continuable: bool) -> AsyncGenerator[Piece | Reply, None]:
        status, streaming, whole = 500, False, bytearray()
        while True:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if events.empty():
                    break
                continue
            what, a, b = getter.result()
            if what == "start":
                status, streaming = a, a == 200 and b
                if streaming:  # vLLM took the request: the client's 200 and its headers go now, as from vllm serve
                    yield Piece("", {} if continuable else None)
            elif streaming and a:
                sse = a.decode()
                yield Piece(mend(sse) if mend is not None else sse, b)
            else:
                whole += a
        if task.exception() is not None:
            raise GenerationFailed(f"vLLM failed the request: {task.exception()!r}") from task.exception()
        usage = usage_of(tap.prompt_tokens, tap.completion_tokens + len(tap.prior))
        if streaming:
            yield Reply(usage=usage)
        elif status >= 400:
            yield error_reply(_error_info(status, bytes(whole)))
        else:
            obj = orjson.loads(whole) if whole else {}
            u = obj.get("usage") if isinstance(obj, dict) else None
            if isinstance(u, dict):
                usage = Usage(prompt_tokens=u.get("prompt_tokens") or 0,
                              completion_tokens=u.get("completion_tokens") or 0,
                              total_tokens=u.get("total_tokens") or 0)
            yield Reply(status=status, body=obj if isinstance(obj, dict) else {"data": obj}, usage=usage)
