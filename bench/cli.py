"""``mgpu bench`` / ``python -m bench``: the load generator's command line (flags -> a
:class:`bench.workload.BenchConfig`, the table, the JSON), and ``--serve-dummy`` (:mod:`bench.dummy`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
from typing import Any

import orjson

from bench.dummy import serve_dummy
from bench.loadgen import raise_nofile, run_async, run_load
from bench.report import format_table
from bench.result import BenchResult, overhead_ms
from bench.workload import DEFAULT_MODEL, BenchConfig, parse_mix


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``mgpu bench``."""
    p = argparse.ArgumentParser(
        prog="mgpu bench",
        description="Load-test an OpenAI-compatible endpoint (or the sim engine in-process).",
    )
    t = p.add_argument_group("target")
    t.add_argument("--url", default="http://127.0.0.1:8000", help="base URL (default %(default)s)")
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    t.add_argument("--stream", action="store_true", help="request SSE streams; measure TTFT")
    t.add_argument("--api-key", default=os.environ.get("MGPU_API_KEY"))
    t.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    t.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                   help="HTTP client: the built-in raw asyncio one (cheapest) or aiohttp")
    r = p.add_argument_group("requests")
    r.add_argument("--max-tokens", type=int, default=32)
    r.add_argument("--mix", default=None,
                   help='max_tokens mix, e.g. "0.9:32,0.1:1024" (overrides --max-tokens)')
    r.add_argument("--prompt-words", type=int, default=32)
    r.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    lg = p.add_argument_group("load")
    m = lg.add_mutually_exclusive_group()
    m.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    m.add_argument("--concurrency", type=int, help="closed loop: concurrent clients")
    lg.add_argument("--duration", type=float, default=10.0, help="measured seconds (default %(default)s)")
    lg.add_argument("--warmup", type=float, default=0.0, help="seconds before measuring")
    lg.add_argument("--requests", type=int, default=None, help="stop after this many requests, if sooner")
    lg.add_argument("--seed", type=int, default=0)
    lg.add_argument("--max-inflight", type=int, default=0, help="open loop: in-flight cap (0: fd limit)")
    lg.add_argument("--procs", type=int, default=1, help="split the load over K processes")
    lg.add_argument("--connections", type=int, default=None,
                    help="raw client: connections to open before the start (default: auto)")
    s = p.add_argument_group("in-process sim engine")
    s.add_argument("--in-process", action="store_true", help="no HTTP: drive a SimEngine in this process")
    s.add_argument("--in-process-baseline", action="store_true",
                   help="after the HTTP run, run the same load in-process and print the difference")
    s.add_argument("--sim-decode-ms", type=float, default=10.0)
    s.add_argument("--sim-decode-ms-per-seq", type=float, default=0.1)
    s.add_argument("--sim-prefill-ms-per-token", type=float, default=0.02)
    s.add_argument("--sim-slots", type=int, default=32)
    s.add_argument("--sim-max-model-len", type=int, default=2048)
    o = p.add_argument_group("output")
    o.add_argument("--json", dest="json_path", default=None, help="write results as JSON here")
    o.add_argument("--raw-samples", action="store_true", help="include per-request samples in the JSON")
    o.add_argument("--markdown", action="store_true", help="print a markdown table")
    o.add_argument("--label", default="")
    p.add_argument("--serve-dummy", metavar="HOST:PORT", default=None,
                   help="run a trivial OpenAI-like server instead (for measuring the generator)")
    p.add_argument("--dummy-delay-ms", type=float, default=0.0, help="dummy server: reply / per-token delay")
    return p


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    """The validated run that the parsed flags describe (ValueError when they describe none)."""
    extra: dict[str, Any] = {}
    if a.extra_body:
        parsed = json.loads(a.extra_body)
        if not isinstance(parsed, dict):
            raise ValueError("--extra-body must be a JSON object")
        extra = parsed
    cfg = BenchConfig(
        url=a.url, model=a.model, endpoint=a.endpoint, stream=a.stream, max_tokens=a.max_tokens,
        mix=parse_mix(a.mix) if a.mix else None, prompt_words=a.prompt_words, rate=a.rate,
        concurrency=a.concurrency, duration=a.duration, warmup=a.warmup, requests=a.requests, seed=a.seed,
        timeout=a.timeout, connections=a.connections, max_inflight=a.max_inflight, procs=a.procs,
        client=a.client, api_key=a.api_key,
        extra_body=extra, label=a.label, in_process=a.in_process, sim_decode_ms=a.sim_decode_ms,
        sim_decode_ms_per_seq=a.sim_decode_ms_per_seq, sim_prefill_ms_per_token=a.sim_prefill_ms_per_token,
        sim_slots=a.sim_slots, sim_max_model_len=a.sim_max_model_len,
    )
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run the load (or the dummy server); exit status 1 when a run had no successful request."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.serve_dummy:
        host, _, port = a.serve_dummy.rpartition(":")
        try:
            run_async(serve_dummy(host or "127.0.0.1", int(port), a.dummy_delay_ms / 1e3,
                             ready=lambda p: print(f"dummy server on {host or '127.0.0.1'}:{p}", flush=True)))
        except KeyboardInterrupt:
            pass
        return 0
    try:
        cfg = config_from_args(a)
    except ValueError as exc:
        parser.error(str(exc))
    if a.in_process_baseline and cfg.in_process:
        parser.error("--in-process-baseline compares an HTTP run; drop --in-process")
    raise_nofile()
    if cfg.procs == 1:
        gc.collect()
        gc.freeze()

    async def go() -> list[BenchResult]:
        results = [await run_load(cfg)]
        if a.in_process_baseline:
            label = (cfg.label + " in-process").strip()
            base = dataclasses.replace(cfg, in_process=True, procs=1, label=label)
            results.append(await run_load(base))
        return results

    results: list[BenchResult] = run_async(go())
    print(format_table(results, markdown=a.markdown))
    doc: dict[str, Any] = {"results": [r.to_dict(with_samples=a.raw_samples) for r in results]}
    if len(results) == 2:
        doc["overhead_ms"] = overhead_ms(results[0], results[1])
        print("\nadded by the HTTP path (http - in-process), ms: "
              + ", ".join(f"{k} {v:.2f}" for k, v in doc["overhead_ms"].items()))
    if a.json_path:
        with open(a.json_path, "wb") as fh:
            fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0 if all(r.ok > 0 for r in results) else 1
