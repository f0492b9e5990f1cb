"""A simulator of a vLLM engine, for machines without GPUs.

It schedules like vLLM's continuous batching: at most ``slots`` sequences run, new ones join at
a step boundary, and every step costs

    decode_ms + decode_ms_per_seq * running + prefill_ms_per_token * (prompt tokens admitted now)

then adds one token to every running sequence.  All costs may be zero (an overhead probe).

Text is deterministic, like greedy decoding of a tiny language model: a token is a word, and the
next token is a function of the two before it, so a sequence resumed from "prompt + generated so
far" continues exactly where it left off.  Token counts are honest: one word, one token.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from common.errors import EngineDead
from common.prompts import context_overflow, sim_prompt_tokens, sim_text
from common.schemas import TokenLogprob
from gpu_worker.engine.base import EngineRequest, InvalidEngineRequest, StepOutput

_WORDS = (
    "the of and to in is it that was for on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know get through back much go good new write our used me man too "
    "any day same right look think also around another came come work three word must because does part "
    "even place well such here take why things help put years different away again off went old number "
    "great tell men say small every found still between name should home big give air line set own under "
    "read last never us left end along while might next sound below saw something thought both few those "
    "always looked show large often together asked house world going want school important until form "
    "food keep children feet land side without boy once animals life enough took sometimes four head "
    "above kind began almost live page got earth need far hand high year mother light parts country "
    "father let night following picture being study second eyes soon times story boys since white"
).split()
VOCAB = len(_WORDS)
CRASH_MARKER = "__mgpu_sim_crash__"  # with sim_faults on: the engine kills its process (poison)
HANG_MARKER = "__mgpu_sim_hang__"  # with sim_faults on: the engine stops stepping (hung engine)


def _word_id(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % VOCAB


def tokenize(text: str) -> list[int]:
    return [_word_id(w) for w in text.split()]


def detokenize(ids: list[int]) -> str:
    """The words of token ids (IndexError for an id outside the vocabulary)."""
    if any(not 0 <= i < VOCAB for i in ids):
        raise IndexError("token id outside the vocabulary")
    return " ".join(_WORDS[i] for i in ids)


def next_token(prev2: int, prev1: int, seed: int) -> int:
    return (prev1 * 1_103_515_245 + prev2 * 12_345 + seed * 2_654_435_761 + 7) % VOCAB


def expected_text(prompt: str | None = None, messages: list[dict[str, str]] | None = None, *,
                  max_tokens: int, seed: int = 0) -> str:
    """What the simulator generates for a request (no stop strings): a reference for checks."""
    ctx = tokenize(sim_text(prompt, messages)) or [0]
    out = []
    for _ in range(max_tokens):
        tok = next_token(ctx[-2] if len(ctx) > 1 else 0, ctx[-1], seed)
        ctx.append(tok)
        out.append(" " + _WORDS[tok])
    return "".join(out)


@dataclass
class _Seq:
    req: EngineRequest
    context: list[int]
    prompt_tokens: int
    out: asyncio.Queue[StepOutput | BaseException] = field(default_factory=asyncio.Queue)
    generated: int = 0
    text: str = ""
    prefilled: bool = False
    done: bool = False


class SimEngine:
    name = "sim"

    def __init__(
        self,
        *,
        slots: int = 32,
        max_model_len: int = 2048,
        prefill_ms_per_token: float = 0.02,
        decode_ms: float = 10.0,
        decode_ms_per_seq: float = 0.1,
        faults: bool = False,
    ) -> None:
        self.slots = slots
        self.max_model_len = max_model_len
        self.prefill_ms_per_token = prefill_ms_per_token
        self.decode_ms = decode_ms
        self.decode_ms_per_seq = decode_ms_per_seq
        self.faults = faults
        self._waiting: deque[_Seq] = deque()
        self._running: dict[str, _Seq] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._hung = False
        self.aborts = 0  # sequences aborted before they finished

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="sim-engine")

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for seq in [*self._waiting, *self._running.values()]:
            seq.out.put_nowait(EngineDead("engine shut down"))
        self._waiting.clear()
        self._running.clear()

    async def check_health(self) -> None:
        if self._task is None or self._task.done():
            raise EngineDead("sim engine loop is not running")
        if self._hung:
            raise EngineDead("sim engine is hung")

    @property
    def load(self) -> int:
        return len(self._running) + len(self._waiting)

    # ------------------------------------------------------------------ requests
    def count_prompt_tokens(self, prompt: str | None, messages: list[dict[str, str]] | None) -> int:
        return sim_prompt_tokens(prompt, messages)

    async def generate(self, req: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        text = sim_text(req.prompt, req.messages)
        context = tokenize(text) + list(req.resume_token_ids)
        prompt_tokens = len(context) - len(req.resume_token_ids)
        if why := context_overflow(self.max_model_len, len(context), req.params.max_tokens or 0):
            raise InvalidEngineRequest(why)
        if self.faults and CRASH_MARKER in text:
            os._exit(17)  # a poison request: the process dies as a CUDA fault would kill it
        if self.faults and HANG_MARKER in text:
            self._hung = True
        seq = _Seq(req=req, context=context or [0], prompt_tokens=prompt_tokens)
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.done:
                seq.done = True
                self.aborts += 1
                self._running.pop(req.request_id, None)
                try:
                    self._waiting.remove(seq)
                except ValueError:
                    pass

    async def abort(self, request_id: str) -> None:
        seq = self._running.pop(request_id, None)
        if seq is None:
            for s in self._waiting:
                if s.req.request_id == request_id:
                    seq = s
                    self._waiting.remove(s)
                    break
        if seq is not None and not seq.done:
            seq.done = True
            self.aborts += 1
            seq.out.put_nowait(asyncio.CancelledError())

    # ------------------------------------------------------------------ scheduler
    async def _loop(self) -> None:
        while True:
            if self._hung or (not self._running and not self._waiting):
                self._wake.clear()
                await self._wake.wait()
                continue
            prefill = 0
            while self._waiting and len(self._running) < self.slots:
                seq = self._waiting.popleft()
                if seq.done:
                    continue
                self._running[seq.req.request_id] = seq
                prefill += len(seq.context)
            cost_ms = (
                self.decode_ms
                + self.decode_ms_per_seq * len(self._running)
                + self.prefill_ms_per_token * prefill
            )
            await asyncio.sleep(cost_ms / 1000.0)
            finished = []
            for rid, seq in self._running.items():
                if seq.done:
                    finished.append(rid)
                    continue
                self._step(seq)
                if seq.done:
                    finished.append(rid)
            for rid in finished:
                self._running.pop(rid, None)

    def _step(self, seq: _Seq) -> None:
        p = seq.req.params
        prev2 = seq.context[-2] if len(seq.context) > 1 else 0
        tok = next_token(prev2, seq.context[-1], p.seed or 0)
        seq.context.append(tok)
        seq.generated += 1
        piece = " " + _WORDS[tok]
        finish: str | None = None
        if p.stop and seq.generated + len(seq.req.resume_token_ids) > p.min_tokens:
            full = seq.req.resume_text + seq.text + piece
            for s in p.stop:
                cut = full.find(s, max(0, len(seq.req.resume_text) + len(seq.text) - len(s)))
                if cut != -1:
                    piece = full[len(seq.req.resume_text) + len(seq.text):cut]
                    finish = "stop"
                    break
        seq.text += piece
        if finish is None and (seq.generated >= (p.max_tokens or 0) or len(seq.context) >= self.max_model_len):
            finish = "length"
        logprobs = None
        if p.logprobs is not None:
            top = {" " + _WORDS[(tok + i) % VOCAB]: -0.1 - i for i in range(p.logprobs)}
            logprobs = [TokenLogprob(token=" " + _WORDS[tok], logprob=-0.1, top_logprobs=top)]
        seq.out.put_nowait(
            StepOutput(text=piece, token_ids=[tok], prompt_tokens=seq.prompt_tokens,
                       completion_tokens=seq.generated, finish_reason=finish, logprobs=logprobs)
        )
        if finish is not None:
            seq.done = True
