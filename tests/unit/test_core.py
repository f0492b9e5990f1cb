"""Pure logic: settings, schemas, the simulator, response shapes, NVML health (with a fake NVML), the
gateway's prompt counter and log lines.  The Lua scripts against a real redis-server are
tests/inproc/test_scripts.py."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from common import errors
from common.protocol import ChatCompletionRequest, CompletionRequest
from common.responses import StreamFormatter
from common.schemas import ChoiceDelta, SamplingParams, Usage, WorkItem, base_request_id, new_request_id
from common.settings import Settings, SettingsError
from gpu_worker.engine.base import EngineRequest, InvalidEngineRequest
from gpu_worker.engine.sim import SimEngine, expected_text
from gpu_worker.nvml import Gpu

# ----------------------------------------------------------------------------- settings


def test_settings_layering_and_errors() -> None:
    s = Settings.load({"slots": "64"}, env={"MGPU_SLOTS": "8", "MGPU_PORT": "9000", "MGPU_ENGINE": "sim"})
    assert (s.slots, s.port, s.engine) == (64, 9000, "sim")  # flags beat the environment
    with pytest.raises(SettingsError, match="MGPU_SLOTS / --slots"):
        Settings.load(env={"MGPU_SLOTS": "0"})
    with pytest.raises(SettingsError, match="MGPU_REDIS_URL"):
        Settings.load(env={"MGPU_REDIS_URL": "http://nope"})
    with pytest.raises(SettingsError, match="MGPU_ENGINE"):
        Settings.load(env={"MGPU_ENGINE": "tensorrt"})


# ----------------------------------------------------------------------------- schemas


def test_requests_validate_like_openai() -> None:
    c = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 5, "x": 1})
    assert c.max_tokens == 5 and c.messages[0].text() == "ab"
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["p"], "stop": "x"}).stop_list() == ["x"]
    for bad in ({"model": "m", "prompt": ["a", "b"]}, {"model": "m", "prompt": "a", "stop": list("abcde")},
                {"model": "", "prompt": "a"}, {"model": "m", "prompt": "a", "frequency_penalty": 3}):
        with pytest.raises(ValueError):
            CompletionRequest.model_validate(bad)


def test_work_item_round_trip_and_checks() -> None:
    item = WorkItem(id="r1", kind="chat", model="m", body={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 3, "stop": ["\n"], "tools": []},
                    reply_to="gw", n=2)
    back = WorkItem.from_fields({b"p": item.to_fields()["p"].encode()})
    assert back == item and back.path == "/v1/chat/completions"
    with pytest.raises(ValueError):
        WorkItem(id="r2", kind="completion", model="m")  # type: ignore[call-arg]  # no body
    with pytest.raises(ValueError):
        WorkItem(id="r3", kind="nope", model="m", body={})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WorkItem.from_fields({b"q": b"{}"})
    rid = new_request_id("chat")
    assert rid.startswith("chatcmpl-") and base_request_id("chat", rid) == rid.removeprefix("chatcmpl-")


def test_errors_cross_the_process_boundary() -> None:
    for cls in (errors.InvalidRequest, errors.ModelNotFound, errors.QueueFull, errors.RequestTimeout,
                errors.RequestCancelled, errors.DeadLettered, errors.GenerationFailed):
        back = errors.from_info(cls("why", param="p").to_info())
        assert type(back) is cls and back.status == cls.status and back.message == "why"


# ----------------------------------------------------------------------------- simulator


async def _collect(engine: SimEngine, req: EngineRequest) -> tuple[str, list[int], str | None]:
    text, ids, finish = "", [], None
    async for out in engine.generate(req):
        text += out.text
        ids += out.token_ids
        finish = out.finish_reason
    return text, ids, finish


async def test_sim_is_deterministic_and_resumable() -> None:
    engine = SimEngine(slots=4, decode_ms=0, decode_ms_per_seq=0, prefill_ms_per_token=0)
    await engine.start()
    try:
        full, ids, finish = await _collect(engine, EngineRequest("a", prompt="x y z", params=SamplingParams(
            max_tokens=20, seed=4)))
        assert finish == "length" and full == expected_text("x y z", max_tokens=20, seed=4)
        head = full.split(" ")[1:9]
        rest, _, _ = await _collect(engine, EngineRequest("b", prompt="x y z", params=SamplingParams(
            max_tokens=12, seed=4), resume_token_ids=ids[:8], resume_text=" " + " ".join(head)))
        assert " " + " ".join(head) + rest == full  # continues exactly where it stopped
        with pytest.raises(InvalidEngineRequest):
            await _collect(engine, EngineRequest("c", prompt="w " * 2040, params=SamplingParams(max_tokens=10)))
    finally:
        await engine.shutdown()


async def test_sim_slot_limit_and_batch_dependent_step_time() -> None:
    engine = SimEngine(slots=2, decode_ms=5, decode_ms_per_seq=5, prefill_ms_per_token=0)
    await engine.start()
    try:
        seen: list[int] = []

        async def run(i: int) -> None:
            async for _ in engine.generate(EngineRequest(str(i), prompt="p", params=SamplingParams(max_tokens=5))):
                seen.append(len(engine._running))

        t0 = time.monotonic()
        await asyncio.gather(*(run(i) for i in range(4)))
        elapsed = time.monotonic() - t0
        assert max(seen) == 2  # never more than the slots
        # two waves of 5 steps at 5 + 5*2 = 15 ms each: about 150 ms, well above 5 steps alone
        assert elapsed >= 0.14
    finally:
        await engine.shutdown()


async def test_sim_abort_is_recorded() -> None:
    engine = SimEngine(slots=2, decode_ms=20)
    await engine.start()
    try:
        gen = engine.generate(EngineRequest("z", prompt="p", params=SamplingParams(max_tokens=100)))
        await gen.__anext__()
        await gen.aclose()
        assert engine.aborts == 1 and engine.load == 0
    finally:
        await engine.shutdown()


# ----------------------------------------------------------------------------- response shapes


def test_stream_formatter_shapes() -> None:
    f = StreamFormatter("chatcmpl-1", "chat", 7, "m", n=1, include_usage=True)
    chunks = f.delta_chunks([ChoiceDelta(index=0, text=" hi", finish_reason="length")])
    # the role chunk comes with the first token, not before it
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {"content": " hi"}, {}]
    assert chunks[0]["usage"] is None and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert [c["choices"][0]["delta"] for c in f.delta_chunks([ChoiceDelta(index=0, text=" x")])] == [{"content": " x"}]
    call = f.delta_chunks([ChoiceDelta(index=1, tool_calls=[{"index": 0, "id": "c"}], finish_reason="tool_calls")])
    assert [c["choices"][0]["delta"] for c in call] == [{"role": "assistant", "content": ""},
                                                         {"tool_calls": [{"index": 0, "id": "c"}]}, {}]
    usage = f.usage_chunk(Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3))
    assert usage is not None and usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    g = StreamFormatter("cmpl-1", "completion", 7, "m", n=1, include_usage=False)
    assert g.usage_chunk(Usage()) is None
    assert "usage" not in g.delta_chunks([ChoiceDelta(text="a")])[0]


# ----------------------------------------------------------------------------- NVML health


class FakeNvml(SimpleNamespace):
    class NVMLError_GpuIsLost(Exception):
        pass

    def __init__(self) -> None:
        super().__init__(nvmlEventTypeXidCriticalError=8, NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
                         NVML_VOLATILE_ECC=0, NVML_TEMPERATURE_GPU=0)
        self.xids: list[int] = []
        self.ecc = 0
        self.free = 10 << 30
        self.lost = False

    def nvmlInit(self) -> None: ...
    def nvmlDeviceGetHandleByIndex(self, i: int) -> str: return f"gpu{i}"
    def nvmlDeviceGetName(self, h: str) -> bytes: return b"NVIDIA H100 80GB HBM3"
    def nvmlEventSetCreate(self) -> str: return "set"
    def nvmlDeviceRegisterEvents(self, h: str, t: int, s: str) -> None: ...
    def nvmlDeviceGetTotalEccErrors(self, h: str, a: int, b: int) -> int: return self.ecc
    def nvmlDeviceGetUtilizationRates(self, h: str) -> Any: return SimpleNamespace(gpu=93)
    def nvmlDeviceGetTemperature(self, h: str, s: int) -> int: return 61
    def nvmlDeviceGetPowerUsage(self, h: str) -> int: return 350_000
    def nvmlDeviceGetUUID(self, h: str) -> str: return "GPU-1"

    def nvmlEventSetWait_v2(self, s: str, ms: int) -> Any:
        if not self.xids:
            raise TimeoutError
        return SimpleNamespace(eventData=self.xids.pop(0))

    def nvmlDeviceGetMemoryInfo(self, h: str) -> Any:
        if self.lost:
            raise self.NVMLError_GpuIsLost()
        return SimpleNamespace(used=(80 << 30) - self.free, total=80 << 30)


def test_gpu_health_flags_each_failure() -> None:
    nv = FakeNvml()
    h = Gpu(0, nv)
    assert h.available and h.name.startswith("NVIDIA H100") and h.check() is None
    r = h.read()
    assert r is not None and (r.utilization_ratio, r.temperature_celsius, r.power_watts) == (0.93, 61, 350.0)
    nv.xids = [13]  # an application fault: not the GPU's
    assert h.check() is None
    nv.xids = [79]  # fallen off the bus
    assert "XID" in (h.check() or "")
    nv.ecc = 2
    assert "uncorrectable ECC" in (h.check() or "")
    nv.ecc, nv.free = 0, 1 << 20
    assert "exhausted" in (h.check() or "")
    nv.lost = True
    assert "lost" in (h.check() or "")
    assert Gpu(None).check() is None and not Gpu(None).available






def test_gateway_prompt_counter(tmp_path: Any) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from gateway.tokens import PromptCounter

    c = PromptCounter()
    assert c.count("sim", ["one two three", "four"], chat=True) == 4  # a chat's contents, summed
    assert c.count("sim", ["one two three", "four"], chat=False) == 3  # several prompts: the longest
    assert c.count("sim", [], chat=True) is None
    assert c.count("vllm", ["x"], chat=False) is None  # unknown: the worker checks
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    spec = str(tmp_path)
    assert c.count(spec, ["a b a"], chat=False) is None  # loads in the background; meanwhile no check
    for t in list(threading.enumerate()):
        if t.name == "tokenizer-load":
            t.join(10)
    assert c.count(spec, ["a b a"], chat=False) == 3
    assert c.count(spec, ["a b", "b"], chat=True) == 3


# ----------------------------------------------------------------------------- log lines


def test_plain_log_lines_cannot_be_forged() -> None:
    import logging

    from common.logs import PlainFormatter

    fmt = PlainFormatter("%(levelname)s %(name)s: %(message)s")
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "model %s", ("m\nFORGED line\x00",), None)
    rec.request_id = "a b=c"
    rec.model = "x" * 1000
    rec.count = 3
    line = fmt.format(rec)
    assert "\n" not in line and "\x00" not in line
    assert line.startswith("INFO x: model m\\nFORGED line\\x00  request_id=\"a b=c\" model=")
    assert "count=3" in line and len(line) < 400  # long values are cut
