"""Chaos benchmark: steady load on sim workers while workers are SIGKILLed, Redis is SIGKILLed and
restarted, and workers are drained and restarted.  Every answer is checked against the
simulator's deterministic text, so a repeated, missing or mixed-up token counts as a duplicate.

    python -m ops.chaos --duration 60 --rate 40 --workers 4 --json chaos.json

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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from common.keys import GROUP, Keys
from gpu_worker.engine.sim import expected_text
from ops.procs import RedisServer, free_port, mgpu_cmd, spawn, terminate, wait_until

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


class Fleet:
    def __init__(self, tmp: Path, workers: int, ns: str, slots: int, decode_ms: float) -> None:
        self.tmp, self.ns, self.slots, self.decode_ms = tmp, ns, slots, decode_ms
        self.redis = RedisServer(tmp / "redis").start()
        self.keys = Keys(ns)
        self.port = free_port()
        self.env = {"MGPU_REDIS_URL": self.redis.url, "MGPU_NAMESPACE": ns, "MGPU_LOG_LEVEL": "WARNING"}
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.n = 0
        for _ in range(workers):
            self.start_worker()
        self.gateway = spawn(mgpu_cmd("gateway"), env={**self.env, "MGPU_PORT": str(self.port),
                                                       "MGPU_REQUEST_TIMEOUT_S": "60"},
                             log_path=tmp / "gateway.log")
        r = self.r()
        wait_until(lambda: all(r.hget(self.keys.worker(w), "state") == b"ready" for w in self.workers), 60,
                   "workers ready")

    def r(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, socket_timeout=2, socket_connect_timeout=1)

    def start_worker(self) -> str:
        wid = f"chaos-w{self.n}"
        self.n += 1
        env = {**self.env, "MGPU_WORKER_ID": wid, "MGPU_MODEL": MODEL, "MGPU_ENGINE": "sim",
               "MGPU_SLOTS": str(self.slots), "MGPU_SIM_DECODE_MS": str(self.decode_ms),
               "MGPU_SIM_DECODE_MS_PER_SEQ": "0.1", "MGPU_DRAIN_GRACE_S": "10"}
        self.workers[wid] = spawn(mgpu_cmd("worker"), env=env, log_path=self.tmp / f"{wid}.log")
        return wid

    def stop(self) -> None:
        for p in [*self.workers.values(), self.gateway]:
            terminate(p, timeout=10)
        self.redis.stop()


def _detect(fleet: Fleet, wid: str, killed_at: float, report: Report) -> None:
    """Time until the registry drops the worker, and until none of its entries is pending."""
    r = fleet.r()
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
            pass
        time.sleep(0.02)


async def _load(fleet: Fleet, rate: float, duration: float, report: Report, stop_at: list[float]) -> None:
    url = f"http://127.0.0.1:{fleet.port}"
    latencies: list[float] = []
    rng = random.Random(7)
    tasks: list[asyncio.Task[None]] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one(i: int) -> None:
            stream = i % 3 == 0
            max_tokens = rng.choice((16, 32, 64, 128))
            prompt = f"chaos request {i}"
            body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": stream, "seed": i % 5}
            chat = i % 2 == 0
            if chat:
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                body["prompt"] = prompt
            want = expected_text(prompt if not chat else None, body.get("messages"), max_tokens=max_tokens,
                                 seed=i % 5)
            path = "/v1/chat/completions" if chat else "/v1/completions"
            report.sent += 1
            t0 = time.monotonic()
            try:
                async with session.post(url + path, json=body) as resp:
                    if resp.status != 200:
                        await resp.read()
                        report.failed_explicit += 1
                        report.errors_by_status[str(resp.status)] = report.errors_by_status.get(str(resp.status), 0) + 1
                        return
                    if stream:
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
                        got = "".join(text)
                        if error is not None:
                            report.failed_explicit += 1
                            key = f"stream:{error.get('code')}"
                            report.errors_by_status[key] = report.errors_by_status.get(key, 0) + 1
                            return
                    else:
                        obj = await resp.json()
                        c = obj["choices"][0]
                        got = c.get("text") if not chat else c["message"]["content"]
                latencies.append(time.monotonic() - t0)
                if got == want:
                    report.succeeded += 1
                else:
                    report.duplicated_or_corrupted += 1
            except (TimeoutError, aiohttp.ClientError):
                report.lost += 1

        start = time.monotonic()
        i = 0
        next_t = start
        while next_t - start < duration:
            now = time.monotonic()
            if now < next_t:
                await asyncio.sleep(next_t - now)
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            next_t += rng.expovariate(rate)
        stop_at.append(time.monotonic())
        await asyncio.gather(*tasks)
    report.duration_s = time.monotonic() - start
    if latencies:
        report.p50_latency_s = statistics.median(latencies)
        report.max_latency_s = max(latencies)


def _chaos(fleet: Fleet, duration: float, every: float, report: Report, done: threading.Event) -> None:
    rng = random.Random(11)
    start = time.monotonic()
    step = 0
    detectors: list[threading.Thread] = []
    while not done.wait(every):
        if time.monotonic() - start > duration - every:
            break
        step += 1
        live = [w for w, p in fleet.workers.items() if p.poll() is None]
        if step == 4:  # Redis dies once (SIGKILL) and comes back on its AOF
            fleet.redis.kill()
            time.sleep(1.0)
            fleet.redis.start()
            report.redis_restarts += 1
        elif step % 5 == 0 and live:  # drain one worker (SIGTERM), then start a replacement
            wid = rng.choice(live)
            fleet.workers[wid].send_signal(signal.SIGTERM)
            report.drains += 1
            fleet.start_worker()
        elif live:
            wid = rng.choice(live)
            fleet.workers[wid].send_signal(signal.SIGKILL)
            t = threading.Thread(target=_detect, args=(fleet, wid, time.monotonic(), report), daemon=True)
            t.start()
            detectors.append(t)
            report.kills += 1
            fleet.start_worker()  # the supervisor's restart
    for t in detectors:
        t.join(35)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def format_report(r: Report) -> str:
    rows = [
        ("requests sent", r.sent), ("succeeded (text verified)", r.succeeded),
        ("failed with an explicit error", f"{r.failed_explicit} {r.errors_by_status or ''}"),
        ("lost (never answered)", r.lost), ("duplicated or corrupted", r.duplicated_or_corrupted),
        ("worker SIGKILLs / drains / Redis restarts", f"{r.kills} / {r.drains} / {r.redis_restarts}"),
        ("detection p50 / max (s)", f"{_pct(r.detection_s, 0.5):.2f} / {max(r.detection_s or [float('nan')]):.2f}"),
        ("recovery p50 / max (s)", f"{_pct(r.recovery_s, 0.5):.2f} / {max(r.recovery_s or [float('nan')]):.2f}"),
        ("latency p50 / max (s)", f"{r.p50_latency_s:.2f} / {r.max_latency_s:.2f}"),
        ("reclaimed / fenced (workers alive at the end)", f"{r.reclaimed} / {r.fenced_writes}"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mgpu chaos", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=40.0, help="requests per second (Poisson)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--decode-ms", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between chaos events")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="mgpu-chaos-") as d:
        fleet = Fleet(Path(d), args.workers, f"chaos{os.getpid()}", args.slots, args.decode_ms)
        try:
            done = threading.Event()
            chaos = threading.Thread(target=_chaos, args=(fleet, args.duration, args.every, report, done))
            chaos.start()
            stop_at: list[float] = []
            asyncio.run(_load(fleet, args.rate, args.duration, report, stop_at))
            done.set()
            chaos.join()
            r = fleet.r()
            for wid in r.smembers(fleet.keys.workers):
                h = r.hgetall(fleet.keys.worker(wid.decode()))
                report.fenced_writes += int(h.get(b"fenced", 0))
                report.reclaimed += int(h.get(b"reclaimed", 0))
        finally:
            fleet.stop()
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(asdict(report), indent=2))
    ok = report.lost == 0 and report.duplicated_or_corrupted == 0 and max(report.detection_s or [0]) <= 5.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
