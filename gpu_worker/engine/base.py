"""The engine interface the worker drives.  ``vllm`` and ``sim`` implement it."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from common.schemas import SamplingParams, TokenLogprob


@dataclass
class EngineRequest:
    """One sequence to generate (the worker splits ``n > 1`` into ``n`` of these).

    ``resume_token_ids`` / ``resume_text`` carry what an earlier attempt already streamed to
    the client: the engine continues after them (prompt + generated so far), and
    ``params.max_tokens`` already excludes them.
    """

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    resume_token_ids: list[int] = field(default_factory=list)
    resume_text: str = ""


@dataclass
class StepOutput:
    """What one engine step added to one sequence."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int  # cumulative, this attempt only
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@runtime_checkable
class Engine(Protocol):
    name: str
    slots: int
    max_model_len: int
    aborts: int  # sequences aborted before they finished (a counter, for metrics)

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, req: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        """Yield outputs as steps finish; closing the iterator early aborts the sequence."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Return if healthy; raise :class:`common.errors.EngineDead` otherwise."""
        ...

    def count_prompt_tokens(self, prompt: str | None, messages: list[dict[str, str]] | None) -> int: ...


class InvalidEngineRequest(ValueError):
    """The engine refuses this request (too long for the context, ...): a client error."""
