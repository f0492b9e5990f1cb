"""Tests of the load generator (bench/: workload, client, rawhttp, loadgen, result, report, cli): its pure
logic, then runs against a fake server."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.cli import main as bench_main
from bench.client import Response, SSEParser
from bench.loadgen import run_load
from bench.rawhttp import RawHttpClient
from bench.report import format_table
from bench.result import Sample, overhead_ms, summarize
from bench.stats import dist_ms, percentile
from bench.workload import BenchConfig, MixSampler, arrival_schedule, parse_mix, poisson_schedule

# ----------------------------------------------------------------------------- schedule and mix


def test_poisson_schedule_has_the_rate_and_exponential_gaps() -> None:
    rate, horizon = 200.0, 500.0
    sched = poisson_schedule(rate, horizon, seed=7)
    assert abs(len(sched) / horizon - rate) / rate < 0.015  # ~100k arrivals: sd 0.3%
    assert sched == sorted(sched) and sched[0] > 0 and sched[-1] < horizon
    gaps = [b - a for a, b in itertools.pairwise(sched)]
    # exponential gaps: the coefficient of variation is 1 (a fixed-interval bug would give 0)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert 0.97 < cv < 1.03


def test_poisson_schedule_is_seeded() -> None:
    a = poisson_schedule(50.0, 20.0, seed=1)
    assert a == poisson_schedule(50.0, 20.0, seed=1)
    assert a != poisson_schedule(50.0, 20.0, seed=2)
    assert poisson_schedule(50.0, 20.0, seed=1, max_n=10) == a[:10]


def test_parse_mix() -> None:
    assert parse_mix("0.9:32,0.1:1024") == [(0.9, 32), (0.1, 1024)]
    assert parse_mix(" 1:16 ") == [(1.0, 16)]
    assert parse_mix("0.5:8, 0.25:16, 0.25:32,") == [(0.5, 8), (0.25, 16), (0.25, 32)]


@pytest.mark.parametrize(
    "spec", ["", "0.9:32", "0.5:8,0.6:16", "0.5-8,0.5:16", "1:0", "1:x", "-0.5:8,1.5:8", "nan:8"]
)
def test_parse_mix_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_mix(spec)


def test_mix_sampler_frequencies_and_seed() -> None:
    mix = parse_mix("0.9:32,0.1:1024")
    s = MixSampler(mix, seed=3)
    many = [s.draw() for _ in range(20000)]
    assert set(many) == {32, 1024}
    assert abs(many.count(1024) / len(many) - 0.1) < 0.01
    s2 = MixSampler(mix, seed=3)
    assert [s2.draw() for _ in range(20000)] == many
    s3 = MixSampler(mix, seed=4)
    assert [s3.draw() for _ in range(200)] != many[:200]
    assert MixSampler([(1.0, 5)], seed=0).draw() == 5


# ----------------------------------------------------------------------------- statistics


def test_percentile_matches_numpy() -> None:
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101, 1000):
        values = sorted(rng.expovariate(1.0) for _ in range(n))
        for q in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert np.isnan(percentile([], 50))


def test_dist_ms() -> None:
    d = dist_ms([0.001, 0.002, 0.003, 0.010])
    assert d is not None
    assert d["p50"] == pytest.approx(2.5) and d["max"] == pytest.approx(10.0)
    assert d["mean"] == pytest.approx(4.0)
    assert dist_ms([]) is None


def _cfg(**kw: Any) -> BenchConfig:
    base: dict[str, Any] = {"rate": 10.0, "duration": 10.0}
    base.update(kw)
    return BenchConfig(**base)


def test_summarize_counts_only_the_window() -> None:
    cfg = _cfg(warmup=1.0, duration=2.0)
    samples = [
        Sample(0.5, 0.5, 1.5, None, 10, 0, None),  # warmup request completing in the window
        Sample(1.0, 1.2, 1.5, None, 4, 0, None),
        Sample(1.5, 1.5, 2.0, None, 6, 0, "HTTP 429"),
        Sample(2.0, 2.0, 2.25, None, 8, 0, None),
        Sample(2.9, 2.9, 3.4, None, 5, 0, None),  # scheduled inside, completes after the window
        Sample(3.0, 3.0, 3.1, None, 9, 0, None),  # scheduled after the window
    ]
    r = summarize(cfg, samples, wall_s=4.0, cpu_s=1.0)
    assert (r.offered, r.sent, r.ok) == (4, 4, 3)
    assert r.errors == {"HTTP 429": 1}
    # completions inside [1, 3]: the warmup one, 1.0 and 2.0 -> 3 requests, 22 tokens in 2 s
    assert r.throughput_rps == pytest.approx(1.5)
    assert r.tokens_per_s == pytest.approx(11.0)
    assert r.completion_tokens == 4 + 8 + 5
    assert r.latency_ms is not None and r.latency_ms["max"] == pytest.approx(500.0)
    assert r.latency_ms["p50"] == pytest.approx(500.0)  # from the schedule: 500, 250, 500 ms
    assert r.service_ms is not None and r.service_ms["p50"] == pytest.approx(300.0)
    assert r.lateness_ms is not None and r.lateness_ms["max"] == pytest.approx(200.0)
    assert r.ttft_ms is None and r.ttft_from_send_ms is None  # not streaming


def test_summarize_latency_counts_from_the_schedule() -> None:
    cfg = _cfg()
    samples = [Sample(1.0, 1.4, 1.5, 1.45, 3, 3, None)]  # sent 400 ms late, served in 100 ms
    r = summarize(dataclass_replace(cfg, stream=True), samples, wall_s=2.0)
    assert r.latency_ms is not None and r.latency_ms["p50"] == pytest.approx(500.0)
    assert r.service_ms is not None and r.service_ms["p50"] == pytest.approx(100.0)
    assert r.ttft_ms is not None and r.ttft_ms["p50"] == pytest.approx(450.0)
    assert r.ttft_from_send_ms is not None and r.ttft_from_send_ms["p50"] == pytest.approx(50.0)
    assert r.fell_behind


def dataclass_replace(cfg: BenchConfig, **kw: Any) -> BenchConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ----------------------------------------------------------------------------- SSE and responses


def _sse_stream() -> bytes:
    return (
        b": keep-alive comment\n\n"
        b'data: {"a": 1}\n\n'
        b'data: {"b":\r\ndata: 2}\r\n\r\n'  # CRLF and an event split over two data lines
        b"event: message\nid: 3\ndata:no-space\n\n"
        b"data: [DONE]\n\n"
    )


def test_sse_parser_whole_and_split_reads_agree() -> None:
    stream = _sse_stream()
    expected = [b'{"a": 1}', b'{"b":\n2}', b"no-space", b"[DONE]"]
    assert SSEParser().feed(stream) == expected
    p = SSEParser()
    one_by_one = [ev for i in range(len(stream)) for ev in p.feed(stream[i : i + 1])]
    assert one_by_one == expected
    rng = random.Random(1)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(stream)), 6))
        p = SSEParser()
        got = [ev for a, b in zip([0, *cuts], [*cuts, len(stream)]) for ev in p.feed(stream[a:b])]
        assert got == expected


def test_sse_parser_holds_an_unfinished_event() -> None:
    p = SSEParser()
    assert p.feed(b'data: {"x": 1}\n') == []  # no blank line yet
    assert p.feed(b"\n") == [b'{"x": 1}']


def _chunk(content: str | None, chat: bool = True) -> bytes:
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if content is None else {"content": content}
        obj: dict[str, Any] = {"choices": [{"index": 0, "delta": delta}]}
    else:
        obj = {"choices": [{"index": 0, "text": content or ""}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_response_stream_ttft_counts_content_not_role() -> None:
    r = Response(stream=True, chat=True)
    r.on_status(200)
    r.on_data(_chunk(None))
    assert r.t_first is None and r.chunks == 0  # role-only chunk: no content yet
    first = _chunk(" hello")
    r.on_data(first[:9])
    assert r.t_first is None
    r.on_data(first[9:])
    t_first = r.t_first
    assert t_first is not None and r.chunks == 1
    r.on_data(_chunk(" world"))
    assert r.t_first == t_first and r.chunks == 2  # TTFT stays the first chunk's time
    r.on_data(b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\ndata: [DO')
    assert not r.done
    r.on_data(b"NE]\n\n")
    r.finish()
    assert r.done and r.error is None and r.tokens == 2 and r.usage_seen


def test_response_stream_without_done_is_an_error() -> None:
    r = Response(stream=True, chat=False)
    r.on_status(200)
    r.on_data(_chunk(" a", chat=False) + _chunk(" b", chat=False))
    r.finish()
    assert r.error == "IncompleteStream"
    assert r.tokens == 2 and not r.usage_seen  # no usage chunk: content chunks stand in


def test_response_stream_error_event_and_http_errors() -> None:
    r = Response(stream=True, chat=True)
    r.on_status(200)
    r.on_data(_chunk(" a") + b'data: {"error": {"message": "engine died"}}\n\ndata: [DONE]\n\n')
    r.finish()
    assert r.error == "StreamError" and "engine died" in r.detail
    r = Response(stream=True, chat=True)
    r.on_status(429)
    r.on_data(b'{"error": {"message": "queue full"}}')
    r.finish()
    assert r.error == "HTTP 429" and "queue full" in r.detail
    r = Response(stream=False, chat=True)
    r.on_status(200)
    r.on_data(b'{"choices": [{"message": {"content": "x"}}], "usage": {"completion_tokens": 7}}')
    r.finish()
    assert r.error is None and r.tokens == 7


# ----------------------------------------------------------------------------- a fake OpenAI server


class FakeOpenAI:
    """Imitates /v1/chat/completions and /v1/completions (JSON and SSE), with injectable faults."""

    def __init__(self) -> None:
        self.reject_every = 0  # every n-th request gets a 429
        self.delay_s = 0.0  # service time before replying
        self.truncate = False  # streams end without [DONE]
        self.close_each = False  # "Connection: close" on every reply
        self.gate_n = 0  # hold every request until this many have arrived
        self._gate = asyncio.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[dict[str, Any]] = []
        self.rejected: list[int] = []  # indices into requests
        self.peers: set[Any] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = len(self.requests)
        self.requests.append(body)
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        if self.gate_n:
            if len(self.requests) >= self.gate_n:
                self._gate.set()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await self._gate.wait()
            self.in_flight -= 1
        if self.reject_every and (n + 1) % self.reject_every == 0:
            self.rejected.append(n)
            return web.json_response({"error": {"message": "queue full", "code": "queue_full"}}, status=429)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # the server's service time (not a test wait)
        chat = request.path.endswith("/chat/completions")
        tokens = int(body["max_tokens"])
        usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": " t" * tokens}
            else:
                choice["text"] = " t" * tokens
            resp: web.StreamResponse = web.json_response({"id": "x", "choices": [choice], "usage": usage})
            if self.close_each:
                resp.force_close()
            return resp
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if self.close_each:
            resp.force_close()
        await resp.prepare(request)
        if chat:
            await resp.write(_chunk(None))
        for _ in range(tokens):
            ev = _chunk(" t", chat=chat)
            await resp.write(ev[:11])  # an event split over two writes
            await resp.write(ev[11:])
        if body.get("stream_options", {}).get("include_usage"):
            await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        if not self.truncate:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    state = FakeOpenAI()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", state.handle)
    app.router.add_post("/v1/completions", state.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield state, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


@pytest.mark.parametrize("client", ["raw", "aiohttp"])
@pytest.mark.parametrize(("endpoint", "stream"), [("chat", False), ("chat", True), ("completions", True)])
async def test_closed_loop_counts_and_errors(
    fake: tuple[FakeOpenAI, str], client: Any, endpoint: Any, stream: bool
) -> None:
    state, url = fake
    state.reject_every = 5
    cfg = BenchConfig(
        url=url, model="m", endpoint=endpoint, stream=stream, concurrency=4, requests=40, duration=60.0,
        mix=parse_mix("0.5:3,0.5:9"), client=client, prompt_words=5,
    )
    r = await run_load(cfg)
    assert len(state.requests) == 40
    assert (r.offered, r.sent, r.ok) == (40, 40, 32)
    assert r.errors == {"HTTP 429": 8}
    assert "queue full" in r.error_details["HTTP 429"]
    ok_tokens = [b["max_tokens"] for i, b in enumerate(state.requests) if i not in state.rejected]
    assert set(ok_tokens) == {3, 9}  # the mix reached the wire
    assert r.completion_tokens == sum(ok_tokens)
    assert r.throughput_rps > 0 and r.latency_ms is not None
    assert len(state.peers) <= 4  # keep-alive: never more connections than clients
    if client == "raw":
        assert r.connections <= 4
    body = state.requests[0]
    assert body["model"] == "m" and len((body.get("prompt") or body["messages"][0]["content"]).split()) == 5
    if stream:
        assert body["stream"] is True and r.ttft_ms is not None
        assert r.chunks_mean == pytest.approx(sum(ok_tokens) / len(ok_tokens))
        assert r.no_usage == 0
    else:
        assert "stream" not in body and r.ttft_ms is None


async def test_open_loop_sends_the_schedule(fake: tuple[FakeOpenAI, str]) -> None:
    state, url = fake
    cfg = BenchConfig(url=url, rate=2000.0, requests=30, duration=60.0, stream=True, seed=5)
    r = await run_load(cfg)
    assert len(state.requests) == 30 and r.ok == 30 and r.errors == {}
    assert r.lateness_ms is not None and r.lateness_ms["mean"] >= 0.0
    sched = [s.sched for s in r.samples]
    assert sched == pytest.approx(arrival_schedule(cfg))  # scheduled, not paced by completions
    assert len(arrival_schedule(cfg, 0, 2)) == 15


async def test_open_loop_arrivals_do_not_wait_for_completions(fake: tuple[FakeOpenAI, str]) -> None:
    """The server answers nothing until all 12 requests arrived: only an open loop gets there."""
    state, url = fake
    state.gate_n = 12
    r = await run_load(BenchConfig(url=url, rate=500.0, requests=12, duration=60.0, timeout=2.0))
    assert r.ok == 12 and state.max_in_flight == 12


async def test_open_loop_charges_late_sends_to_latency(fake: tuple[FakeOpenAI, str]) -> None:
    """Coordinated omission: with one request in flight at a time, the queue shows in latency."""
    state, url = fake
    state.delay_s = 0.02
    cfg = BenchConfig(url=url, rate=1000.0, requests=10, duration=60.0, max_inflight=1, seed=1)
    r = await run_load(cfg)
    assert r.ok == 10
    assert r.service_ms is not None and r.latency_ms is not None and r.lateness_ms is not None
    assert r.service_ms["p50"] < 60.0  # each request is served in ~20 ms ...
    # ... but the 10th was scheduled within ~15 ms of the first and sent only after 9 x 20 ms
    assert r.latency_ms["max"] > 150.0
    assert r.lateness_ms["max"] > 130.0
    assert r.fell_behind


async def test_connection_close_and_truncated_streams(fake: tuple[FakeOpenAI, str]) -> None:
    state, url = fake
    state.close_each = True
    r = await run_load(BenchConfig(url=url, concurrency=2, requests=12, duration=60.0, stream=True))
    assert r.ok == 12 and r.connections == 12  # the raw client honours Connection: close
    state.close_each = False
    state.truncate = True
    r = await run_load(BenchConfig(url=url, concurrency=2, requests=6, duration=60.0, stream=True))
    assert r.ok == 0 and r.errors == {"IncompleteStream": 6}


@pytest.mark.parametrize("client", ["raw", "aiohttp"])
async def test_timeouts_and_refused_connections_are_counted(
    fake: tuple[FakeOpenAI, str], client: Any
) -> None:
    state, url = fake
    state.delay_s = 0.5
    r = await run_load(
        BenchConfig(url=url, concurrency=2, requests=2, duration=60.0, timeout=0.05, client=client)
    )
    assert r.ok == 0 and r.errors == {"TimeoutError": 2}
    r = await run_load(BenchConfig(url="http://127.0.0.1:9", concurrency=1, requests=3, duration=60.0))
    assert r.ok == 0 and sum(r.errors.values()) == 3 and r.sent == 0


async def test_procs_merge_shards(fake: tuple[FakeOpenAI, str]) -> None:
    state, url = fake
    state.reject_every = 4
    r = await run_load(BenchConfig(url=url, rate=400.0, requests=20, duration=60.0, procs=2))
    assert len(state.requests) == 20
    assert r.offered == 20 and r.ok == 15 and r.errors == {"HTTP 429": 5}
    assert r.procs == 2 and r.cpu_s > 0


# ----------------------------------------------------------------------------- in-process and CLI


async def test_in_process_drives_the_sim_engine() -> None:
    cfg = BenchConfig(
        in_process=True, concurrency=4, requests=24, duration=60.0, mix=parse_mix("0.5:3,0.5:7"),
        sim_decode_ms=0.0, sim_decode_ms_per_seq=0.0, sim_prefill_ms_per_token=0.0, sim_slots=2,
    )
    r = await run_load(cfg)
    assert r.target == "in-process" and r.ok == 24 and r.errors == {}
    assert {s.tokens for s in r.samples} == {3, 7}
    assert all(s.chunks == s.tokens for s in r.samples)
    assert r.completion_tokens == sum(s.tokens for s in r.samples)
    assert r.ttft_ms is not None


async def test_in_process_over_long_requests_are_errors() -> None:
    cfg = BenchConfig(in_process=True, concurrency=1, requests=2, duration=60.0, max_tokens=100,
                      sim_max_model_len=64, sim_decode_ms=0.0)
    r = await run_load(cfg)
    assert r.ok == 0 and r.errors == {"InvalidEngineRequest": 2}


def test_main_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    rc = bench_main(["--in-process", "--rate", "500", "--requests", "5", "--duration", "30", "--stream",
                     "--sim-decode-ms", "0", "--label", "probe", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    (res,) = doc["results"]
    assert res["label"] == "probe" and res["ok"] == 5 and res["sent"] == 5 and res["ttft_ms"]["p50"] >= 0
    assert "samples" not in res
    printed = capsys.readouterr().out
    assert "probe" in printed and "p99 ms" in printed


def test_cli_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        bench_main(["--rate", "1", "--concurrency", "2"])
    with pytest.raises(SystemExit):
        bench_main(["--duration", "1"])  # neither rate nor concurrency
    with pytest.raises(SystemExit):
        bench_main(["--rate", "1", "--mix", "0.5:3"])


def test_format_table_lists_errors_and_warnings() -> None:
    cfg = _cfg(label="x")
    samples = [Sample(0.1, 0.2, 0.3, None, 1, 0, None), Sample(0.2, 0.3, 0.4, None, 0, 0, "HTTP 503")]
    r = summarize(cfg, samples, wall_s=1.0, error_details={"HTTP 503": "no worker"})
    text = format_table([r])
    assert "HTTP 503: 1" in text and "no worker" in text and "fell behind" in text
    md = format_table([r, r], markdown=True)
    assert md.splitlines()[0].startswith("| label") and len(md.splitlines()) >= 4
    assert overhead_ms(r, r) == {"latency_p50": 0.0, "latency_p90": 0.0, "latency_p99": 0.0,
                                       "latency_mean": 0.0}


async def test_raw_client_resends_once_on_a_stale_keep_alive_connection() -> None:
    """A server that silently drops connections after one reply (a keep-alive timeout race)."""
    reply = b'{"choices": [{"text": "x"}], "usage": {"completion_tokens": 1}}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(reply)

    class OneShot(asyncio.Protocol):
        served = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            assert isinstance(self.transport, asyncio.WriteTransport)
            if self.served:
                self.transport.close()  # the second request on this connection: no reply
            else:
                self.served = True
                self.transport.write(head + reply)

    server = await asyncio.get_running_loop().create_server(OneShot, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = RawHttpClient(f"http://127.0.0.1:{port}", "completions")
        errors = []
        for _ in range(5):
            resp = Response(stream=False, chat=False)
            await client.send(b"{}", resp, timeout=5.0)
            resp.finish()
            errors.append(resp.error)
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
    assert errors == [None] * 5
    assert client.stale_retries == 4 and client.connections_opened == 5


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_open_loop_never_sends_early(loop: str) -> None:
    """uvloop's 1 ms timers round to nearest: a plain sleep(delay) wakes early for sub-ms gaps."""
    cfg = BenchConfig(in_process=True, rate=2000.0, requests=300, duration=60.0, max_tokens=1,
                      sim_decode_ms=0.0, sim_decode_ms_per_seq=0.0, sim_prefill_ms_per_token=0.0)
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        r = uvloop.run(run_load(cfg))
    else:
        r = asyncio.run(run_load(cfg))
    assert r.ok == 300
    lateness = [s.sent - s.sched for s in r.samples if s.sent is not None]
    assert len(lateness) == 300 and min(lateness) >= 0.0


def test_clientcost_summary_pairs_the_clients_of_one_repetition() -> None:
    from bench.clientcost import summary

    rows = [{"repeat": k, "target": "dummy", "stream": False, "client": c, "us_per_req": us}
            for k, c, us in [(1, "raw", 100.0), (1, "aiohttp", 250.0), (2, "aiohttp", 300.0), (2, "raw", 200.0),
                             (3, "raw", 110.0), (3, "aiohttp", 260.0)]]
    (cell,) = summary(rows)
    assert cell["raw"] == {"median": 110.0, "min": 100.0, "max": 200.0}
    assert cell["aiohttp"] == {"median": 260.0, "min": 250.0, "max": 300.0}
    assert cell["aiohttp_over_raw"] == round(260 / 110, 2) and cell["aiohttp_over_raw_min"] == 1.5
