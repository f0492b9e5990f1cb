"""Benchmarks of issue 12 (API keys): per-key limits across gateway replicas, and fair sharing.

    python -m bench.keys limits --json docs/keylimits.json
    python -m bench.keys fairness --json docs/fairness.json

``limits``: 4 gateway replicas and a sim fleet on one redis-server, API keys on.  One key with rpm = 600 is
offered 3x that for 60 s, spread round-robin over the replicas: how many requests were accepted (200), the
rest refused (429), none failed.  Then a fresh key with tpm = 12,000 offered 3x its tokens the same way:
the tokens of the accepted requests.  The limits are kept in Redis by the ENQUEUE script, so the replicas
together admit the limit, not 4 times it.

``fairness``: a saturated sim fleet (2 workers x 8 slots, each request about 0.7 s).  A light key sends
3 requests/s; after ``--alone`` seconds a second key floods at 10x that (30/s, above the fleet's ~23/s) for
``--duration`` s.  The light key's queue time (``Result.queue_s``: from the gateway's enqueue to the start of
the attempt that answered, read from Redis) alone and under the flood, for the default (fair lanes and
slots kept for lanes below their share) and for first come first served (``fair_lanes=false``,
``fair_reserve_slots=0``), each on a fresh fleet.

Sim figures only: no GPU is involved, and none of these numbers is a GPU figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.fleet import Fleet
from bench.report import machine
from bench.stats import pct
from common.schemas import Result
from ops.keys import KeyStore

MODEL = "sim-keys"


@dataclass
class Sent:
    """What one open-loop sender saw."""

    statuses: dict[int, int] = field(default_factory=dict)
    ids: list[tuple[float, str]] = field(default_factory=list)  # (send time, request id) of each 200
    tokens: int = 0  # total_tokens of the accepted requests
    errors: int = 0  # transport errors and timeouts


async def open_loop(session: aiohttp.ClientSession, urls: list[str], key: str, rate: float, duration: float,
                    body: dict[str, Any], out: Sent, *, seed: int = 0) -> None:
    """Poisson arrivals at ``rate`` for ``duration`` s, round-robin over ``urls``; each request its own task."""
    rnd = random.Random(seed)
    headers = {"Authorization": f"Bearer {key}"}
    tasks: list[asyncio.Task[None]] = []

    async def one(url: str, t: float) -> None:
        try:
            async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
                payload = await r.json(content_type=None)
                out.statuses[r.status] = out.statuses.get(r.status, 0) + 1
                if r.status == 200:
                    out.ids.append((t, r.headers["x-request-id"]))
                    out.tokens += int(payload["usage"]["total_tokens"])
        except (aiohttp.ClientError, TimeoutError):
            out.errors += 1

    start = time.monotonic()
    t, i = 0.0, 0
    while t < duration:
        delay = start + t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(urls[i % len(urls)], t)))
        i += 1
        t += rnd.expovariate(rate)
    await asyncio.gather(*tasks)


def _machine() -> dict[str, Any]:
    return {**machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ----------------------------------------------------------------------------- limits


async def _limit_run(urls: list[str], key: str, rate: float, duration: float, body: dict[str, Any]) -> Sent:
    out = Sent()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        await open_loop(s, urls, key, rate, duration, body, out)
    return out


def limits(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="mgpu-keylimits-"))
    with Fleet.launch(tmp, appendonly=True, settings={"model": MODEL, "auth": "keys"}) as f:
        for _ in range(2):
            f.start_worker(model=MODEL, slots=64, sim_decode_ms=1, sim_decode_ms_per_seq=0)
        gws = [f.start_gateway() for _ in range(args.replicas)]
        urls = [f"http://127.0.0.1:{g.port}" for g in gws]
        store = KeyStore(f.r, f.keys)
        report: dict[str, Any] = {"machine": _machine(), "replicas": args.replicas, "duration_s": args.duration}
        # requests per minute: 600, offered 1,800/min (30/s)
        key = store.create("rpm", rpm=600)[1]
        body = {"model": MODEL, "prompt": "one two three four", "max_tokens": 8}
        sent = asyncio.run(_limit_run(urls, key, 600 * 3 / 60, args.duration, body))
        ok = sent.statuses.get(200, 0)
        report["rpm"] = {"limit": 600, "offered_per_min": 1800, "statuses": sent.statuses, "errors": sent.errors,
                         "accepted": ok, "accepted_vs_limit": round(ok / 600, 4)}
        print(f"rpm: limit 600, offered 1800/min over {args.replicas} replicas for {args.duration:.0f} s: "
              f"accepted {ok} ({sent.statuses}), errors {sent.errors}", flush=True)
        # tokens per minute: 12,000; each request reserves prompt + max_tokens and uses about as much
        key = store.create("tpm", tpm=12_000)[1]
        body = {"model": MODEL, "prompt": "one two three four", "max_tokens": 16}
        per_req = 20  # 4 prompt tokens + 16: the sim answers max_tokens tokens
        rate = 12_000 * 3 / 60 / per_req
        sent = asyncio.run(_limit_run(urls, key, rate, args.duration, body))
        report["tpm"] = {"limit": 12_000, "offered_tokens_per_min": 36_000, "statuses": sent.statuses,
                         "errors": sent.errors, "accepted_requests": sent.statuses.get(200, 0),
                         "accepted_tokens": sent.tokens,
                         "accepted_vs_limit": round(sent.tokens / 12_000, 4)}
        print(f"tpm: limit 12000, offered 36000/min: accepted {sent.tokens} tokens in "
              f"{sent.statuses.get(200, 0)} requests ({sent.statuses}), errors {sent.errors}", flush=True)
    return report


# ----------------------------------------------------------------------------- fairness


def _queue_times(f: Fleet, ids: list[tuple[float, str]]) -> list[float]:
    r = f.r
    out = []
    for _t, rid in ids:
        raw = r.get(f.keys.result(MODEL, rid))
        if raw:
            q = Result.model_validate_json(raw).queue_s
            if q is not None:
                out.append(q * 1000)
    return out


def _summary(ms: list[float]) -> dict[str, Any]:
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 1) if ms else None,
            "p99_ms": round(pct(ms, 99), 1) if ms else None, "max_ms": round(max(ms), 1) if ms else None}


async def _fair_phases(url: str, light: str, flood: str, args: argparse.Namespace) -> tuple[Sent, Sent, Sent]:
    body = {"model": MODEL, "prompt": "one two three four", "max_tokens": 32}
    alone, shared, flooding = Sent(), Sent(), Sent()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        await open_loop(s, [url], light, args.light_rate, args.alone, body, alone, seed=1)
        await asyncio.gather(
            open_loop(s, [url], light, args.light_rate, args.duration, body, shared, seed=2),
            open_loop(s, [url], flood, args.light_rate * 10, args.duration, body, flooding, seed=3))
    return alone, shared, flooding


def fairness(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": _machine(), "light_rate": args.light_rate, "flood_rate": args.light_rate * 10,
                              "alone_s": args.alone, "duration_s": args.duration, "workers": 2, "slots": 8}
    modes: dict[str, dict[str, dict[str, Any]]] = {
        "fair": {"gateway": {}, "worker": {}},
        "fifo": {"gateway": {"fair_lanes": "false"}, "worker": {"fair_reserve_slots": 0}}}
    for mode, extra in modes.items():
        tmp = Path(tempfile.mkdtemp(prefix=f"mgpu-fair-{mode}-"))
        with Fleet.launch(tmp, appendonly=True, settings={"model": MODEL, "auth": "keys"}) as f:
            for _ in range(2):
                f.start_worker(model=MODEL, slots=8, sim_decode_ms=20, sim_decode_ms_per_seq=0.5, **extra["worker"])
            f.start_gateway(**extra["gateway"])
            store = KeyStore(f.r, f.keys)
            light, flood = store.create("light")[1], store.create("flood")[1]
            alone, shared, flooding = asyncio.run(_fair_phases(f.base_url, light, flood, args))
            row: dict[str, Any] = {"light_alone": {**_summary(_queue_times(f, alone.ids)), "statuses": alone.statuses},
                   "light_with_flood": {**_summary(_queue_times(f, shared.ids)), "statuses": shared.statuses},
                   "flood": {**_summary(_queue_times(f, flooding.ids)), "statuses": flooding.statuses,
                             "errors": flooding.errors}}
            a, w = row["light_alone"]["p99_ms"], row["light_with_flood"]["p99_ms"]
            row["p99_ratio"] = round(w / a, 2) if a and w else None
            report[mode] = row
            print(f"{mode}: light p99 queue alone {a} ms, with a 10x flood {w} ms (ratio {row['p99_ratio']}); "
                  f"light {row['light_with_flood']}, flood {row['flood']}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.keys", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    lp = sub.add_parser("limits")
    lp.add_argument("--replicas", type=int, default=4)
    lp.add_argument("--duration", type=float, default=60.0, help="the limits are per sliding minute: keep 60")
    fp = sub.add_parser("fairness")
    fp.add_argument("--light-rate", type=float, default=3.0)
    fp.add_argument("--alone", type=float, default=30.0)
    fp.add_argument("--duration", type=float, default=60.0)
    for p in (lp, fp):
        p.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    report = limits(args) if args.what == "limits" else fairness(args)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
