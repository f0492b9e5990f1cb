"""Load-balancing strategies end to end: real redis-server, gateway and sim workers as processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections import Counter
from typing import Any

import httpx

from common.schemas import Result
from ops.procs import free_port, mgpu_cmd, spawn, terminate, wait_until
from tests.conftest import ROOT, Stack, http_get

FAST = {"model": "m", "sim_decode_ms": 2, "sim_decode_ms_per_seq": 0, "sim_prefill_ms_per_token": 0, "slots": 8}
SLOW = {**FAST, "sim_decode_ms": 50}


_IDS: dict[str, str] = {}  # a test's tag of a request -> the id the gateway gave it


def _post(stack: Stack, tag: str, max_tokens: int = 2, user: str | None = None, timeout: float = 30) -> int:
    body: dict[str, Any] = {"model": "m", "prompt": f"hello {tag}", "max_tokens": max_tokens}
    if user:
        body["user"] = user
    r = httpx.post(stack.base_url + "/v1/completions", json=body, headers={"X-Request-Id": tag}, timeout=timeout)
    if r.status_code == 200:
        _IDS[tag] = r.json()["id"]
    return r.status_code


def _served_by(stack: Stack, tag: str) -> str | None:
    raw = stack.result_raw(_IDS.get(tag, tag))
    return None if raw is None else Result.model_validate_json(raw).worker


def _workers(stack: Stack) -> dict[str, Any]:
    return http_get(stack.base_url + "/workers")[1]  # type: ignore[no-any-return]


def _in_flight(stack: Stack, wid: str) -> int:
    return next((w["in_flight"] for w in _workers(stack)["workers"] if w["id"] == wid), -1)


def _live(stack: Stack) -> set[str]:
    return {w["id"] for w in _workers(stack)["workers"] if w["state"] == "ready"}


def _routed_metric(stack: Stack) -> dict[tuple[str, str], float]:
    text = httpx.get(stack.base_url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("mgpu_gateway_routed_requests_total{"):
            labels = dict(p.split("=") for p in line[line.index("{") + 1:line.index("}")].split(","))
            out[(labels["worker"].strip('"'), labels["strategy"].strip('"'))] = float(line.split()[-1])
    return out


async def _post_many(stack: Stack, n: int, max_tokens: int, prefix: str) -> list[int]:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as c:
        async def one(i: int) -> int:
            r = await c.post("/v1/completions", headers={"X-Request-Id": f"{prefix}-{i}"},
                             json={"model": "m", "prompt": f"p {i}", "max_tokens": max_tokens})
            if r.status_code == 200:
                _IDS[f"{prefix}-{i}"] = r.json()["id"]
            return r.status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_round_robin_cycles_over_ready_workers_and_skips_a_dead_one(stack: Stack) -> None:
    ws = [stack.start_worker(**FAST, worker_id=f"rr{i}") for i in range(3)]
    stack.start_gateway(strategy="round_robin")
    wait_until(lambda: len(_live(stack)) == 3, 10, "3 workers in the gateway's view")
    order = []
    for i in range(9):
        assert _post(stack, f"rr-a{i}") == 200
        order.append(_served_by(stack, f"rr-a{i}"))
    assert order == ["rr0", "rr1", "rr2"] * 3
    info = _workers(stack)
    assert info["strategy"] == "round_robin"
    assert {w["id"]: w["pushed"] for w in info["workers"]} == {"rr0": 3, "rr1": 3, "rr2": 3}
    assert _routed_metric(stack)[("rr1", "round_robin")] == 3
    os.kill(ws[1].proc.pid, signal.SIGKILL)
    wait_until(lambda: _live(stack) == {"rr0", "rr2"}, 10, "dead worker out of the view")
    served = []
    for i in range(6):
        assert _post(stack, f"rr-b{i}") == 200
        served.append(_served_by(stack, f"rr-b{i}"))
    assert Counter(served) == {"rr0": 3, "rr2": 3}
    assert served[0] != served[1] and served[:2] * 3 == served  # still a strict cycle


def test_weighted_shares_end_to_end(stack: Stack) -> None:
    stack.start_worker(**FAST, worker_id="light", weight=1)
    stack.start_worker(**FAST, worker_id="heavy", weight=3)
    stack.start_gateway(strategy="weighted")
    wait_until(lambda: len(_live(stack)) == 2, 10, "2 workers in the gateway's view")
    n = 400
    statuses = asyncio.run(_post_many(stack, n, 2, "wt"))
    assert statuses.count(200) == n
    served = Counter(_served_by(stack, f"wt-{i}") for i in range(n))
    assert abs(served["heavy"] - 0.75 * n) <= 0.05 * 0.75 * n, served
    assert abs(served["light"] - 0.25 * n) <= 0.05 * 0.25 * n, served
    pushed = {w["id"]: w["pushed"] for w in _workers(stack)["workers"]}
    assert pushed == {"light": 100, "heavy": 300}


def test_least_loaded_sends_to_the_idle_worker(stack: Stack) -> None:
    stack.start_worker(**{**SLOW, "slots": 2}, worker_id="busy")
    stack.start_gateway(strategy="least_loaded")
    # fill the only worker with two long requests, then add an idle one
    busy = spawn([sys.executable, "-c", (
        "import httpx, concurrent.futures as f\n"
        f"u='{stack.base_url}/v1/completions'\n"
        "with f.ThreadPoolExecutor(2) as ex:\n"
        "    list(ex.map(lambda i: httpx.post(u, json={'model':'m','prompt':'x','max_tokens':1000}, timeout=60),"
        " range(2)))\n")])
    try:
        wait_until(lambda: _in_flight(stack, "busy") == 2, 15, "busy worker full")
        stack.start_worker(**FAST, worker_id="idle")
        wait_until(lambda: len(_live(stack)) == 2, 10, "2 workers in the gateway's view")
        for i in range(10):
            assert _post(stack, f"ll-{i}") == 200
            assert _served_by(stack, f"ll-{i}") == "idle", (i, _workers(stack))
    finally:
        terminate(busy)


def test_affinity_keeps_a_user_on_one_worker_and_spills_when_full(stack: Stack) -> None:
    stack.start_worker(**{**SLOW, "slots": 2}, worker_id="a1")
    stack.start_worker(**{**SLOW, "slots": 2}, worker_id="a2")
    stack.start_gateway(strategy="prefix_affinity")
    wait_until(lambda: len(_live(stack)) == 2, 10, "2 workers in the gateway's view")
    owners = {}
    for user in ("alice", "bob", "carol", "dave"):
        served = set()
        for i in range(4):
            # a settled view: its counts come from heartbeats every 0.5 s and can still count a request that has
            # ended; a view that showed the owner's 2 slots taken spilled one of "dave"'s requests once in CI
            wait_until(lambda: _in_flight(stack, "a1") == 0 and _in_flight(stack, "a2") == 0, 10, "idle view")
            assert _post(stack, f"af-{user}-{i}", user=user) == 200
            served.add(_served_by(stack, f"af-{user}-{i}"))
        assert len(served) == 1, (user, served)
        owners[user] = served.pop()
    user = "alice"
    owner = owners[user]
    other = "a2" if owner == "a1" else "a1"

    # let the registry settle (no stale in_flight from the requests above) before filling the owner
    wait_until(lambda: _in_flight(stack, owner) == 0 and _in_flight(stack, other) == 0, 10, "idle view")

    async def fill_then_spill() -> tuple[list[int], str | None]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as c:
            long = [asyncio.create_task(c.post("/v1/completions", json={
                "model": "m", "prompt": f"long {i}", "max_tokens": 100, "user": user})) for i in range(2)]
            await asyncio.to_thread(wait_until, lambda: _in_flight(stack, owner) == 2, 15, "owner full")
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "short", "max_tokens": 2, "user": user})
            spilled_by = _served_by(stack, r.json()["id"])
            return [r.status_code, *[(await t).status_code for t in long]], spilled_by

    statuses, spilled_by = asyncio.run(fill_then_spill())
    assert statuses == [200, 200, 200]
    assert spilled_by == other  # the owner was full: the request went to the shared stream
    assert _workers(stack)["shared_routed"] >= 1
    assert _routed_metric(stack)[("shared", "prefix_affinity")] >= 1


def _own_backlog(stack: Stack, wid: str) -> int:
    s = stack.keys.worker_stream("m", wid)
    if not stack.r.exists(s):
        return 0
    groups = stack.r.xinfo_groups(s)
    return sum(int(g["lag"]) for g in groups)  # unread entries (the lag stays exact: common.lua._SAFE_DEL)


def test_killed_worker_own_stream_entries_complete_elsewhere(stack: Stack) -> None:
    victim = stack.start_worker(**{**SLOW, "slots": 1}, worker_id="victim")
    stack.start_worker(**{**SLOW, "slots": 16}, worker_id="healthy")
    stack.start_gateway(strategy="round_robin")
    wait_until(lambda: len(_live(stack)) == 2, 10, "2 workers in the gateway's view")
    n = 12
    result: dict[str, Any] = {}

    async def load() -> None:
        result["statuses"] = await _post_many(stack, n, 20, "kill")

    async def scenario() -> None:
        task = asyncio.create_task(load())
        # the victim holds one entry and has unread ones waiting in its own stream
        await asyncio.to_thread(wait_until, lambda: _own_backlog(stack, "victim") >= 4, 15, "victim backlog")
        os.kill(victim.proc.pid, signal.SIGKILL)
        result["killed_at"] = time.monotonic()
        await asyncio.to_thread(wait_until, lambda: _own_backlog(stack, "victim") == 0, 10, "backlog moved")
        result["moved_after_s"] = time.monotonic() - result["killed_at"]
        await task
        result["done_after_s"] = time.monotonic() - result["killed_at"]

    asyncio.run(scenario())
    assert result["statuses"] == [200] * n
    served = Counter(_served_by(stack, f"kill-{i}") for i in range(n))
    assert served["healthy"] == n - served["victim"] and served["victim"] <= 1, served
    assert result["moved_after_s"] <= 5.0, result
    # the entry the victim was running is reclaimed after its lease; every request is done soon after
    assert result["done_after_s"] <= 5.0 + 20 * 0.05 + 2, result
    wait_until(lambda: not stack.r.exists(stack.keys.worker_stream("m", "victim")), 10, "victim stream deleted")
    assert not stack.r.sismember(stack.keys.worker_streams("m"), "victim")


def test_draining_worker_hands_back_its_own_stream(stack: Stack) -> None:
    leaving = stack.start_worker(**{**SLOW, "slots": 1}, worker_id="leaving")
    stack.start_worker(**{**SLOW, "slots": 16}, worker_id="staying")
    stack.start_gateway(strategy="round_robin")
    wait_until(lambda: len(_live(stack)) == 2, 10, "2 workers in the gateway's view")
    n = 10
    out: dict[str, Any] = {}

    async def scenario() -> None:
        task = asyncio.create_task(_post_many(stack, n, 40, "drain"))
        await asyncio.to_thread(wait_until, lambda: _own_backlog(stack, "leaving") >= 3, 15, "backlog")
        leaving.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        await asyncio.to_thread(wait_until, lambda: _own_backlog(stack, "leaving") == 0, 5, "backlog moved")
        out["moved_after_s"] = time.monotonic() - t0
        out["statuses"] = await task

    asyncio.run(scenario())
    assert out["statuses"] == [200] * n
    assert out["moved_after_s"] < 1.5  # moved at drain start, not after the in-flight request
    served = Counter(_served_by(stack, f"drain-{i}") for i in range(n))
    assert served == {"leaving": 1, "staying": n - 1}, served
    assert leaving.proc.wait(15) == 0


def test_strategy_switch_at_run_time_drops_nothing(stack: Stack) -> None:
    stack.start_worker(**FAST, worker_id="s1")
    stack.start_worker(**FAST, worker_id="s2")
    stack.start_gateway(gateway_id="gw-switch")  # pull
    wait_until(lambda: len(_live(stack)) == 2, 10, "2 workers in the gateway's view")
    assert _workers(stack)["strategy"] == "pull"

    async def scenario() -> list[int]:
        switched = asyncio.Event()
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as c:
            async def client(k: int) -> list[int]:
                codes = []
                after = 0
                while after < 20:  # keep going across the switch, then 20 more requests each
                    r = await c.post("/v1/completions", json={"model": "m", "prompt": f"{k}", "max_tokens": 3})
                    codes.append(r.status_code)
                    after += switched.is_set()
                return codes

            tasks = [asyncio.create_task(client(k)) for k in range(4)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(stack.r.hset, stack.keys.control, "strategy", "round_robin")
            await asyncio.to_thread(wait_until, lambda: _workers(stack)["strategy"] == "round_robin", 5, "switch")
            switched.set()
            return [c for t in tasks for c in await t]

    codes = asyncio.run(scenario())
    assert len(codes) >= 80 and codes == [200] * len(codes)
    info = _workers(stack)
    assert all(w["pushed"] > 0 for w in info["workers"]), info
    assert info["shared_routed"] > 0
    # a field for another gateway does not apply here; one for this gateway wins over the global one
    stack.r.hset(stack.keys.control, f"strategy:{uuid.uuid4().hex}", "weighted")
    stack.r.hset(stack.keys.control, "strategy:gw-switch", "least_loaded")
    wait_until(lambda: _workers(stack)["strategy"] == "least_loaded", 5, "per-gateway override")


def test_sim_server_speaks_openai(stack: Stack) -> None:
    port = free_port()
    p = spawn(mgpu_cmd("sim-server", "--port", str(port), "--model", "sim", "--sim-decode-ms", "1"),
              env={"PYTHONPATH": str(ROOT)}, log_path=stack.tmp / "sim-server.log", cwd=str(ROOT))
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return http_get(base + "/health")[0] == 200
            except OSError:
                return False

        wait_until(up, 20, "sim-server up")
        import openai

        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        r = c.completions.create(model="sim", prompt="one two three", max_tokens=5)
        assert r.usage is not None and r.usage.completion_tokens == 5 and r.usage.prompt_tokens == 3
        assert r.choices[0].finish_reason == "length" and len(r.choices[0].text.split()) == 5
        ch = c.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert ch.choices[0].message.role == "assistant" and ch.usage is not None
        assert ch.usage.completion_tokens == 4
        parts, usage = [], None
        for chunk in c.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, stream=True, stream_options={"include_usage": True}):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(parts) == ch.choices[0].message.content  # deterministic sim text
        assert usage is not None and usage.completion_tokens == 4
        with c.completions.with_streaming_response.create(model="sim", prompt="x", max_tokens=3, stream=True) as s:
            body = s.read()
        assert body.rstrip().endswith(b"data: [DONE]")
        bad = httpx.post(base + "/v1/completions", json={"model": "nope", "prompt": "x"})
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
    finally:
        terminate(p)
