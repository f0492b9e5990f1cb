"""Chaos benchmark: steady load on sim workers while workers are SIGKILLed, Redis is SIGKILLed and
restarted, and workers are drained and restarted.  Every answer is checked against the
simulator's deterministic text, so a repeated, missing or mixed-up token counts as a duplicate.

    python -m bench.chaos --duration 60 --rate 40 --workers 4 --json chaos.json

It prints one table: requests sent, succeeded, failed with an explicit error, lost (never
answered), duplicated/corrupted, and detection and recovery times of the killed workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from bench.fleet import Fleet, Proc
from bench.loadgen import open_loop
from bench.stats import pct
from bench.workload import poisson_schedule
from common.keys import GROUP
from gpu_worker.engine.sim import expected_text

MODEL = "chaos-sim"


@dataclass
class Report:
    sent: int = 0
    succeeded: int = 0
    failed_explicit: int = 0
    lost: int = 0
    duplicated_or_corrupted: int = 0
    errors_by_status: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    redis_restarts: int = 0
    drains: int = 0
    detection_s: list[float] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)
    fenced_writes: int = 0
    reclaimed: int = 0
    duration_s: float = 0.0
    p50_latency_s: float = 0.0
    max_latency_s: float = 0.0

    def failed(self, key: str) -> None:
        self.failed_explicit += 1
        self.errors_by_status[key] = self.errors_by_status.get(key, 0) + 1


def _start_worker(fleet: Fleet, slots: int, decode_ms: float) -> Proc:
    """A sim worker with the next ``chaos-wN`` id (not waited for: the load runs meanwhile)."""
    return fleet.start_worker(wait=False, worker_id=f"chaos-w{len(fleet.workers())}", model=MODEL, engine="sim",
                              slots=slots, sim_decode_ms=decode_ms, sim_decode_ms_per_seq=0.1, drain_grace_s=10)


def _detect(fleet: Fleet, wid: str, killed_at: float, report: Report) -> None:
    """Time until the registry drops the worker, and until none of its entries is pending."""
    r = fleet.redis_client(socket_timeout=2, socket_connect_timeout=1)
    detected = None
    deadline = killed_at + 30
    while time.monotonic() < deadline:
        try:
            now = time.monotonic()
            if detected is None and not r.exists(fleet.keys.worker(wid)):
                detected = now - killed_at
            pend = r.xpending_range(fleet.keys.stream(MODEL), GROUP, "-", "+", 1, consumername=wid)
            if detected is not None and not pend:
                report.detection_s.append(detected)
                report.recovery_s.append(now - killed_at)
                return
        except redis.RedisError:
            pass  # Redis is down (the chaos restarts it): poll again
        time.sleep(0.02)


@dataclass
class _Check:
    """Request ``i`` of the load and the text the simulator must answer it with."""

    path: str
    body: dict[str, Any]
    want: str

    @classmethod
    def make(cls, i: int, max_tokens: int) -> _Check:
        prompt = f"chaos request {i}"
        body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": i % 3 == 0, "seed": i % 5}
        chat = i % 2 == 0
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        want = expected_text(None if chat else prompt, body.get("messages"), max_tokens=max_tokens, seed=i % 5)
        return cls("/v1/chat/completions" if chat else "/v1/completions", body, want)


async def _answer(resp: aiohttp.ClientResponse, check: _Check, report: Report) -> str | None:
    """The text of a 200 reply; None (counted as an explicit failure) for an error event in a stream."""
    if not check.body["stream"]:
        c = (await resp.json())["choices"][0]
        return str(c["message"]["content"] if "messages" in check.body else c.get("text"))
    text, error = [], None
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        obj = json.loads(line[6:])
        if "error" in obj:
            error = obj["error"]
            continue
        for c in obj["choices"]:
            text.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    if error is not None:
        report.failed(f"stream:{error.get('code')}")
        return None
    return "".join(text)


async def _load(fleet: Fleet, rate: float, duration: float, report: Report) -> None:
    """Poisson arrivals at ``rate`` for ``duration`` s; every answer checked and counted in ``report``
    (no answer: lost; an answer that is not the simulator's text, or no valid reply at all: corrupted)."""
    url = fleet.base_url
    latencies: list[float] = []
    rng = random.Random(7)
    start = time.monotonic()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one(i: int, _at: float) -> None:
            check = _Check.make(i, rng.choice((16, 32, 64, 128)))
            report.sent += 1
            t0 = time.monotonic()
            try:
                async with session.post(url + check.path, json=check.body) as resp:
                    if resp.status != 200:
                        await resp.read()
                        report.failed(str(resp.status))
                        return
                    got = await _answer(resp, check, report)
            except (TimeoutError, aiohttp.ClientError):
                report.lost += 1
                return
            except (ValueError, KeyError, IndexError, TypeError):  # a reply that is not a completion
                report.duplicated_or_corrupted += 1
                return
            if got is None:
                return
            latencies.append(time.monotonic() - t0)
            if got == check.want:
                report.succeeded += 1
            else:
                report.duplicated_or_corrupted += 1

        await open_loop(poisson_schedule(rate, duration, seed=7), time.perf_counter(), one, drain_s=130.0)
    report.duration_s = time.monotonic() - start
    if latencies:
        report.p50_latency_s = pct(latencies, 50)
        report.max_latency_s = max(latencies)


def _chaos(fleet: Fleet, args: argparse.Namespace, report: Report, done: threading.Event) -> None:
    """Every ``args.every`` s one event until ``done``: SIGKILL a worker (and start a replacement); at the
    4th event SIGKILL Redis and restart it; at every 5th drain a worker (SIGTERM) and start a replacement."""
    every, duration = args.every, args.duration
    rng = random.Random(11)
    start = time.monotonic()
    step = 0
    detectors: list[threading.Thread] = []
    while not done.wait(every):
        if time.monotonic() - start > duration - every:
            break
        step += 1
        live = [p for p in fleet.workers() if p.alive]
        if step == 4:  # Redis dies once (SIGKILL) and comes back on its AOF
            fleet.redis_server.kill()
            time.sleep(1.0)
            fleet.redis_server.start()
            report.redis_restarts += 1
        elif step % 5 == 0 and live:  # drain one worker (SIGTERM), then start a replacement
            rng.choice(live).proc.send_signal(signal.SIGTERM)
            report.drains += 1
            _start_worker(fleet, args.slots, args.decode_ms)
        elif live:
            victim = rng.choice(live)
            victim.proc.send_signal(signal.SIGKILL)
            assert victim.worker_id is not None
            t = threading.Thread(target=_detect, args=(fleet, victim.worker_id, time.monotonic(), report), daemon=True)
            t.start()
            detectors.append(t)
            report.kills += 1
            _start_worker(fleet, args.slots, args.decode_ms)  # the supervisor's restart
    for t in detectors:
        t.join(35)


def format_report(r: Report) -> str:
    """The chaos table: one ``name  value`` line per figure."""
    nan = float("nan")
    rows = [
        ("requests sent", r.sent), ("succeeded (text verified)", r.succeeded),
        ("failed with an explicit error", f"{r.failed_explicit} {r.errors_by_status or ''}"),
        ("lost (never answered)", r.lost), ("duplicated or corrupted", r.duplicated_or_corrupted),
        ("worker SIGKILLs / drains / Redis restarts", f"{r.kills} / {r.drains} / {r.redis_restarts}"),
        ("detection p50 / max (s)", f"{pct(r.detection_s, 50):.2f} / {max(r.detection_s or [nan]):.2f}"),
        ("recovery p50 / max (s)", f"{pct(r.recovery_s, 50):.2f} / {max(r.recovery_s or [nan]):.2f}"),
        ("latency p50 / max (s)", f"{r.p50_latency_s:.2f} / {r.max_latency_s:.2f}"),
        ("reclaimed / fenced (workers alive at the end)", f"{r.reclaimed} / {r.fenced_writes}"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def run(args: argparse.Namespace, tmp: Path) -> Report:
    """Start the fleet, run load and chaos together, read the workers' counters, stop the fleet."""
    report = Report()
    with Fleet.launch(tmp, ns=f"chaos{os.getpid()}") as fleet:
        for _ in range(args.workers):
            _start_worker(fleet, args.slots, args.decode_ms)
        fleet.start_gateway(timeout=60, request_timeout_s=60)
        fleet.wait_routable(60)
        done = threading.Event()
        chaos = threading.Thread(target=_chaos, args=(fleet, args, report, done))
        chaos.start()
        try:
            asyncio.run(_load(fleet, args.rate, args.duration, report))
        finally:
            done.set()
            chaos.join()
        r = fleet.r
        for wid in r.smembers(fleet.keys.workers):
            h = r.hgetall(fleet.keys.worker(wid.decode()))
            report.fenced_writes += int(h.get(b"fenced", 0))
            report.reclaimed += int(h.get(b"reclaimed", 0))
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the chaos benchmark; exit status 0 when nothing was lost or corrupted and detection took <= 5 s."""
    ap = argparse.ArgumentParser(prog="mgpu chaos", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=40.0, help="requests per second (Poisson)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--decode-ms", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between chaos events")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--logs", help="keep the fleet's logs (and Redis data) in this folder")
    args = ap.parse_args(argv)
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
        report = run(args, Path(args.logs))
    else:
        with tempfile.TemporaryDirectory(prefix="mgpu-chaos-") as d:
            report = run(args, Path(d))
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(asdict(report), indent=2))
    ok = report.lost == 0 and report.duplicated_or_corrupted == 0 and max(report.detection_s or [0]) <= 5.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
