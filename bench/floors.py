"""The floors under mgpu's CPU per request on this machine: what one Redis round trip costs the server and a
Python client, and what one HTTP request costs the ASGI server the gateway runs on, with nothing of mgpu in it.

1. Redis: a redis-server as mgpu runs it (AOF, ``appendfsync everysec``) and one redis-py asyncio client on
   uvloop (the gateway's and the worker's client), calling one command at a time: ``PING``, ``SET``,
   ``XADD``, ``EVALSHA`` of a script that does nothing, and ``XREADGROUP`` over 1 and over 9 streams (a
   worker's read: its own stream, the shared one and 7 fair lanes) that each find one entry.  CPU per call
   of redis-server and of the client process, from /proc.  Then the same through mgpu's pooled client
   (``common.redis_conn.make_client``) and through the hot path's pipelined connection (``common.redis_pipe``).
2. HTTP: uvicorn with the gateway's options (uvloop, httptools) serving a pure ASGI app that reads the body
   and answers a fixed chat completion, loaded by ``python -m bench`` (the same open loop as every other
   benchmark): CPU per request of the server.  ``--servers uvicorn,granian`` measures Granian (a Rust HTTP
   server running the same ASGI app on uvloop, one worker: its CPU is its whole process tree) beside it,
   alternating, ``--repeats`` times each, in the open loop and in a closed loop of 64 clients.

mgpu's gateway makes one HTTP exchange and two Redis round trips per request (ENQUEUE, its share of the
reply read); a worker two (its read, FINISH); redis-server serves four.  These floors, times those counts,
are the least this design can cost in Python and Redis on this machine.

    python -m bench.floors --json docs/floors.json
    python -m bench.floors --redis-only --json docs/floors-pipe.json
    python -m bench.floors --http-only --servers uvicorn,granian --repeats 2 --json docs/floors-servers.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aredis

from bench.cpucost import cpu_s, run_and_report
from bench.fleet import ROOT, Proc, wait_http_ok
from bench.report import tree_cpu
from common.redis_conn import make_client
from common.redis_pipe import RedisPipe
from ops.procs import RedisServer, free_port, spawn, terminate

REPLY = json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "w " * 16}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24}}).encode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The least an OpenAI endpoint can do: read the body, parse it, answer JSON."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    json.loads(body or b"{}")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(REPLY)).encode())]})
    await send({"type": "http.response.body", "body": REPLY})


async def _redis_calls(url: str, n: int) -> dict[str, dict[str, float]]:
    r = aredis.Redis.from_url(url)
    noop = await r.script_load("return 1")
    lanes = [f"s:{i}" for i in range(9)]
    for s in lanes:
        await r.xgroup_create(s, "g", id="0", mkstream=True)

    async def xread(streams: list[str]) -> None:
        await r.xadd(streams[-1], {"p": "x"})  # untimed below: subtracted with an XADD-only run
        await r.xreadgroup("g", "c", {s: ">" for s in streams}, count=1)

    pooled = make_client(url)  # the gateway's and the worker's client: a blocking pool
    pipe = RedisPipe.of(pooled)
    assert pipe is not None

    async def piped_xread(streams: list[str]) -> None:
        await r.xadd(streams[-1], {"p": "x"})
        await pipe.call("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "STREAMS", *streams, *(">" for _ in streams))

    calls = {"PING": lambda: r.ping(), "SET": lambda: r.set("k", "v"), "XADD": lambda: r.xadd("x", {"p": "x"}),
             "EVALSHA (noop script)": lambda: r.evalsha(noop, 0),
             "XADD + XREADGROUP, 1 stream": lambda: xread(lanes[:1]),
             "XADD + XREADGROUP, 9 streams": lambda: xread(lanes),
             "EVALSHA (noop), mgpu's pooled client (make_client)": lambda: pooled.evalsha(noop, 0),
             "EVALSHA (noop), common.redis_pipe": lambda: pipe.call("EVALSHA", noop, 0),
             "XADD + XREADGROUP, 9 streams, the XREADGROUP through common.redis_pipe": lambda: piped_xread(lanes)}
    pid = int((await r.info("server"))["process_id"])
    out: dict[str, dict[str, float]] = {}
    for name, call in calls.items():
        for _ in range(200):
            await call()
        s0, c0, t0 = cpu_s(pid), time.process_time(), time.perf_counter()
        for _ in range(n):
            await call()
        out[name] = {"server_us": 1e6 * (cpu_s(pid) - s0) / n, "client_us": 1e6 * (time.process_time() - c0) / n,
                     "wall_us": 1e6 * (time.perf_counter() - t0) / n}
    pipe.close()
    await pooled.aclose()
    await r.aclose()
    return out


def redis_floor(tmp: Path, n: int) -> dict[str, dict[str, float]]:
    server = RedisServer(tmp / "redis").start()
    try:
        import uvloop
        return uvloop.run(_redis_calls(server.url, n))
    finally:
        server.stop()


def _server_cmd(server: str, port: int) -> list[str]:
    if server == "granian":
        return [sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--workers", "1",
                "--runtime-threads", "1", "--runtime-mode", "st", "--host", "127.0.0.1", "--port", str(port),
                "--no-log", "bench.floors:app"]
    return [sys.executable, "-c", f"import uvicorn, bench.floors as f; uvicorn.run(f.app, host='127.0.0.1', "
            f"port={port}, loop='uvloop', http='httptools', log_level='warning', access_log=False)"]


def http_floor(tmp: Path, rate: float, requests: int, server: str = "uvicorn") -> dict[str, Any]:
    """CPU per request of ``server`` with the bare ASGI app: open loop at ``rate`` (0: closed loop, 64 clients)."""
    port = free_port()
    log = tmp / f"http-{server}.log"
    proc = spawn(_server_cmd(server, port), env={**os.environ, "PYTHONPATH": str(ROOT)}, log_path=log,
                 cwd=str(ROOT))
    try:
        wait_http_ok(Proc("ASGI server", proc, log, port=port), f"http://127.0.0.1:{port}/", 30)
        time.sleep(0.5)  # a worker process's start-up is not counted
        out = tmp / "load.json"
        load = ["--rate", str(rate)] if rate else ["--concurrency", "64"]
        cmd = [sys.executable, "-m", "bench", "--url", f"http://127.0.0.1:{port}", "--model", "m", "--max-tokens", "16",
               *load, "--requests", str(requests), "--duration", "600", "--json", str(out)]
        c0 = tree_cpu({"s": proc.pid})["s"]  # Granian serves from a child process
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
        res = json.loads(out.read_text())["results"][0]
        return {"server": server, "load": f"{rate:.0f} req/s" if rate else "closed loop, 64 clients",
                "server_us_per_req": 1e6 * (tree_cpu({"s": proc.pid})["s"] - c0) / max(1, res["ok"]), "ok": res["ok"],
                "p50_ms": res["latency_ms"]["p50"], "p99_ms": res["latency_ms"]["p99"]}
    finally:
        terminate(proc)


def measure(a: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not a.http_only:
        rows = [{"kind": "redis", "call": name, **v} for name, v in redis_floor(tmp, a.calls).items()]
    servers = a.servers.split(",") if not a.redis_only else []
    for rate, n in ((a.rate, a.requests), *(((0.0, 4 * a.requests),) if len(servers) > 1 else ())):
        for _ in range(a.repeats):
            rows += [{"kind": "http", **http_floor(tmp, rate, n, server)} for server in servers]
    return rows


def table(rows: list[dict[str, Any]], rate: float) -> str:
    out = []
    if any(r["kind"] == "redis" for r in rows):
        out = ["| Redis call, one at a time | redis-server µs/call | client µs/call | wall µs/call |",
               "|---|---:|---:|---:|"]
        out += [f"| {r['call']} | {r['server_us']:.1f} | {r['client_us']:.1f} | {r['wall_us']:.1f} |"
                for r in rows if r["kind"] == "redis"]
    if not any(r["kind"] == "http" for r in rows):
        return "\n".join(out)
    out += ["", "| ASGI server (uvloop; a fixed chat completion) | load | CPU µs/request | p50 ms | p99 ms |",
            "|---|---|---:|---:|---:|"]
    out += [f"| {r['server']} | {r['load']} | {r['server_us_per_req']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
            for r in rows if r["kind"] == "http"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__, formatter_class=fmt)
    for flag, kind, default in (("--calls", int, 20_000), ("--rate", float, 400.0), ("--requests", int, 6000)):
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--servers", default="uvicorn", help="ASGI servers to measure, comma-separated: uvicorn, granian")
    p.add_argument("--repeats", type=int, default=1, help="runs of each server, alternating")
    p.add_argument("--http-only", action="store_true", help="skip the Redis floors")
    p.add_argument("--redis-only", action="store_true", help="skip the HTTP floors")
    p.add_argument("--json", dest="json_path")
    return run_and_report("floors", p.parse_args(argv), measure, table)


if __name__ == "__main__":
    sys.exit(main())
