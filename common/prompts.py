"""Prompts: the one context-length rule (checked by the gateway before queueing, by the worker before
the engine, and by each engine on what it really feeds the model, resumed tokens included), and how
the simulator turns a request into prompt text and counts its tokens (shared by the sim engine,
``gpu_worker.engine.sim``, and the gateway).  A real model's chat template and tokenizer are vLLM's
(``gpu_worker.engine.vllm_engine``)."""

from __future__ import annotations


def context_overflow(max_model_len: int, prompt_tokens: int, max_tokens: int | None) -> str | None:
    """Why ``prompt_tokens`` plus ``max_tokens`` (None: at least one) do not fit the context, or None."""
    wanted = max_tokens if max_tokens is not None else 1
    if prompt_tokens + wanted <= max_model_len:
        return None
    return (f"this model's maximum context length is {max_model_len} tokens; the request has {prompt_tokens} "
            f"prompt tokens and asks for {wanted if max_tokens is not None else 'at least 1'} completion tokens")


def render_chat(messages: list[dict[str, str]]) -> str:
    """The simulator's chat template: ``role: content`` lines, then ``assistant:``."""
    return "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages) + "assistant:"


def sim_text(prompt: str | None, messages: list[dict[str, str]] | None) -> str:
    """The text the simulator reads for a completion (``prompt``) or a chat (``messages``)."""
    return render_chat(messages) if messages is not None else (prompt or "")


def sim_prompt_tokens(prompt: str | None, messages: list[dict[str, str]] | None) -> int:
    """The simulator's prompt length: one token per word."""
    return len(sim_text(prompt, messages).split())
