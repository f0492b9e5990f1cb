"""The real thing on this machine: gateway + a vLLM worker (CPU build) serving the embedded
SmolLM2-135M-Instruct, driven by the official openai client; and ``mgpu up`` as the README runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.settings import Settings
from ops.procs import RedisServer, free_port, wait_until
from tests.conftest import ROOT, Stack, wait_ready

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MODEL = "SmolLM2-135M-Instruct"


def _model_dir() -> Path:
    from gpu_worker.model_store import ensure_embedded_model

    return ensure_embedded_model(Path(Settings.load().model_cache_dir))


@pytest.fixture(scope="module")
def vllm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _model_dir()  # convert once, outside the worker's start-up
    tmp = tmp_path_factory.mktemp("vllm")
    srv = RedisServer(tmp / "redis").start()
    s = Stack(tmp, srv)
    s.start_worker(engine="vllm", model=MODEL, slots=4, max_model_len=2048, vllm_enforce_eager="true",
                   vllm_kv_cache_gb=1, timeout=240)
    s.start_gateway()
    yield s
    s.stop_all()
    srv.stop()


def test_chat_completion_with_usage(vllm_stack: Stack) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_model_dir()))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = vllm_stack.openai(timeout=120).chat.completions.create(model=MODEL, messages=msgs, max_tokens=24,  # type: ignore[arg-type]
                                                                 temperature=0)
    text = r.choices[0].message.content
    assert text and text.strip()
    assert r.usage is not None
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    n_prompt = len(tok.encode(rendered, add_special_tokens=False))
    assert r.usage.prompt_tokens == n_prompt
    assert 1 <= r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 24


def test_streamed_chat_yields_chunks_then_done(vllm_stack: Stack) -> None:
    stream = vllm_stack.openai(timeout=120).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to ten."}], max_tokens=20,
        temperature=0, stream=True)
    pieces = [ch.choices[0].delta.content for ch in stream if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces).strip()  # the SDK stops at [DONE]


def test_two_requests_share_one_engine_batch(vllm_stack: Stack) -> None:
    """b is sent once a is decoding; a cannot end early (ignore_eos), so if the worker batched them, b's
    first token arrives before a's last. A worker that ran one request at a time would start b after a."""
    client = vllm_stack.openai(timeout=120)
    arrivals: dict[str, list[float]] = {"a": [], "b": []}
    a_decoding = threading.Event()

    def run(name: str, max_tokens: int) -> None:
        s = client.completions.create(model=MODEL, prompt=f"Once upon a time, {name}", max_tokens=max_tokens,
                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
        for ch in s:
            if ch.choices and ch.choices[0].text:
                arrivals[name].append(time.monotonic())
                a_decoding.set()

    ta = threading.Thread(target=run, args=("a", 64))
    ta.start()
    assert a_decoding.wait(120)
    tb = threading.Thread(target=run, args=("b", 16))
    tb.start()
    for t in (ta, tb):
        t.join(120)
    a, b = arrivals["a"], arrivals["b"]
    assert len(a) >= 32 and len(b) >= 8  # ignore_eos: each ran to (about) its max_tokens
    assert a[0] < b[0] < a[-1]  # b decoded while a was still decoding


def test_mgpu_up_serves_the_embedded_model(tmp_path: Path) -> None:
    _model_dir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MGPU_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", MGPU_VLLM_KV_CACHE_GB="1", MGPU_SLOTS="4")
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "up", "--port", str(port), "--data-dir",
                             str(tmp_path / "data")], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, port, tmp_path / "up.log", 300)
        import openai

        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                      max_tokens=16)
        assert r.choices[0].message.content and r.usage is not None and r.usage.completion_tokens > 0
        assert (tmp_path / "data" / "redis" / "appendonlydir").is_dir()  # its own Redis, AOF on
        wait_until(lambda: "mgpu is up" in (tmp_path / "up.log").read_text(), 10, "announcement")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
        log.close()
    assert rc == 0, (tmp_path / "up.log").read_text()[-3000:]


def test_overlong_prompt_refused_before_queueing(vllm_stack: Stack) -> None:
    import httpx

    s = vllm_stack
    body = {"model": MODEL, "prompt": "hello " * 3000, "max_tokens": 8}
    stream = s.keys.stream(MODEL)

    def refused_at_gateway() -> bool:
        before = int(s.r.xinfo_stream(stream)["entries-added"])
        r = httpx.post(s.base_url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
        return int(s.r.xinfo_stream(stream)["entries-added"]) == before

    # the worker refuses it exactly; once the gateway has loaded the model's tokenizer (in the
    # background, on first sight of the model) it is refused before anything is queued
    wait_until(refused_at_gateway, 30, "gateway-side refusal", interval=0.5)


def test_the_workers_metrics_carry_vllms_own(vllm_stack: Stack) -> None:
    """As `vllm serve`'s /metrics: the engine's steps (tokens per step), its TTFT and queue time, beside mgpu's."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    s = vllm_stack
    (wid,) = [p.worker_id for p in s.workers()]
    port = int(s.r.hget(s.keys.worker(str(wid)), "metrics_port") or 0)

    def steps() -> tuple[float, set[str]]:
        fams = list(text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text))
        count = sum(x.value for f in fams if f.name == "vllm:iteration_tokens_total" for x in f.samples
                    if x.name.endswith("_count"))
        return count, {f.name for f in fams}

    before, names = steps()
    s.openai(timeout=120).completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                             extra_body={"ignore_eos": True})
    after, _ = steps()
    assert after >= before + 4  # a prefill step and three decode steps at least
    assert {"vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds",
            "mgpu_worker_time_to_first_token_seconds"} <= names
