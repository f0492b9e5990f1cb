"""OpenAI response shapes, built from mgpu's internal Result and Chunk."""

from __future__ import annotations

from typing import Any

from common.errors import MgpuError
from common.schemas import ChoiceDelta, Result, Usage


def error_body(err: MgpuError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def _completion_logprobs(lps: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any] | None:
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset
    for lp in lps:
        tok = str(lp.get("token", ""))
        tokens.append(tok)
        token_lps.append(lp.get("logprob"))
        tops.append(lp.get("top_logprobs") or {})
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(lps: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if lps is None:
        return None
    return {"content": [
        {"token": lp.get("token", ""), "logprob": lp.get("logprob"), "bytes": None,
         "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in (lp.get("top_logprobs") or {}).items()]}
        for lp in lps]}


def usage_dict(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def full_response(r: Result, model: str) -> dict[str, Any]:
    if r.kind == "chat":
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c.logprobs), "finish_reason": c.finish_reason} for c in r.choices]
        obj = "chat.completion"
    else:
        choices = [{"index": c.index, "text": c.text, "logprobs": _completion_logprobs(c.logprobs),
                    "finish_reason": c.finish_reason} for c in r.choices]
        obj = "text_completion"
    return {"id": r.id, "object": obj, "created": r.created, "model": model, "choices": choices,
            "usage": usage_dict(r.usage)}


class StreamFormatter:
    """Builds the SSE chunk objects of one streaming request, exactly as OpenAI sends them."""

    def __init__(self, request_id: str, kind: str, created: int, model: str, n: int, include_usage: bool):
        self.id = request_id
        self.kind = kind
        self.created = created
        self.model = model
        self.n = n
        self.include_usage = include_usage
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._offsets = [0] * n

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        env: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created,
                               "model": self.model, "choices": choices}
        if self.include_usage:
            env["usage"] = None
        return env

    def role_chunks(self) -> list[dict[str, Any]]:
        if self.kind != "chat":
            return []
        return [self._envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]) for i in range(self.n)]

    def delta_chunks(self, deltas: list[ChoiceDelta]) -> list[dict[str, Any]]:
        out = []
        for d in deltas:
            if self.kind == "chat":
                if d.text or d.finish_reason is None:
                    out.append(self._envelope([{"index": d.index, "delta": {"content": d.text},
                                                "logprobs": _chat_logprobs(d.logprobs), "finish_reason": None}]))
                if d.finish_reason is not None:
                    out.append(self._envelope([{"index": d.index, "delta": {}, "logprobs": None,
                                                "finish_reason": d.finish_reason}]))
            else:
                off = self._offsets[d.index] if d.index < self.n else 0
                out.append(self._envelope([{"index": d.index, "text": d.text,
                                            "logprobs": _completion_logprobs(d.logprobs, off),
                                            "finish_reason": d.finish_reason}]))
                if d.index < self.n:
                    self._offsets[d.index] += len(d.text)
        return out

    def usage_chunk(self, u: Usage) -> dict[str, Any] | None:
        if not self.include_usage:
            return None
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [], "usage": usage_dict(u)}
