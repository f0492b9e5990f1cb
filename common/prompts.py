"""How the simulator turns a request into prompt text and counts its tokens, shared by the sim engine
(``gpu_worker.engine.sim``) and the gateway, which checks a sim model's prompt length before queueing.
A real model's chat template and tokenizer are vLLM's (``gpu_worker.engine.vllm_engine``)."""

from __future__ import annotations


def render_chat(messages: list[dict[str, str]]) -> str:
    """The simulator's chat template: ``role: content`` lines, then ``assistant:``."""
    return "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages) + "assistant:"


def sim_text(prompt: str | None, messages: list[dict[str, str]] | None) -> str:
    """The text the simulator reads for a completion (``prompt``) or a chat (``messages``)."""
    return render_chat(messages) if messages is not None else (prompt or "")


def sim_prompt_tokens(prompt: str | None, messages: list[dict[str, str]] | None) -> int:
    """The simulator's prompt length: one token per word."""
    return len(sim_text(prompt, messages).split())
