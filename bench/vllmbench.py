"""vLLM's own benchmark client (``vllm bench serve``) against ``vllm serve`` and against mgpu over one vLLM
worker, same model (the embedded SmolLM2-135M-Instruct), same vLLM, same engine flags, one after the other
in one run (two CPU cores: running them side by side would have each slow the other).

    python -m bench.vllmbench --json docs/vllmbench.json

Each target gets the same workload: ``--num-prompts`` random prompts of ``--input-len`` tokens, ``--output-len``
tokens each with ``--ignore-eos`` (so every request must generate exactly that many), all sent at once
(``--request-rate inf``).  A third run, ``vllm serve`` with vLLM's own defaults instead of mgpu's worker
flags, shows what the flags change.  The CPU build's ``vllm`` console script cannot find its distribution
metadata, so the client runs as ``vllm.benchmarks.serve``'s ``add_cli_args`` and ``main`` (in a subprocess).

Each run records the engine's own counters (steps, tokens per step, its TTFT and queue times; behind mgpu also
the wait in Redis) and the CPU of each process tree.  ``--repeats N`` alternates the order, ``--variant
SETTING=VALUE`` adds an mgpu target with one worker setting changed, ``--pin`` puts the engine's processes on a
CPU of their own, and ``--timeline`` keeps each request's send, first token and end (docs/benchmarks.md §4b).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.fleet import Fleet, Proc, terminate_all, wait_http_ok
from bench.report import machine_cpu, tree_cpu, tree_pids
from ops.procs import free_port, spawn

MODEL = "SmolLM2-135M-Instruct"
_CLIENT = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
           "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
           "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
_KEEP = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
         "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
         "mean_itl_ms", "median_itl_ms", "p99_itl_ms")


def worker_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"engine": "vllm", "model": MODEL, "slots": args.slots, "max_model_len": args.max_model_len,
            "vllm_enforce_eager": True, "vllm_kv_cache_gb": args.kv_cache_gb}


_ENGINE = {"steps": ("vllm:iteration_tokens_total", "_count"), "step_tokens": ("vllm:iteration_tokens_total", "_sum"),
           **{f"{k}_{x}": (name, "_count" if x == "n" else "_sum")
              for k, name in (("ttft", "vllm:time_to_first_token_seconds"),
                              ("queue", "vllm:request_queue_time_seconds"),
                              ("prefill", "vllm:request_prefill_time_seconds"),
                              ("redis_queue", "mgpu_worker_queue_wait_seconds")) for x in ("n", "s")}}


def engine_counters(metrics_url: str) -> dict[str, float]:
    """vLLM's own counters (``vllm:*``) from a /metrics: ``vllm serve``'s, or an mgpu worker's, which carries them."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(_ENGINE, 0.0)
    for fam in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for key, (name, suffix) in _ENGINE.items():
            if fam.name == name:
                out[key] += sum(x.value for x in fam.samples if x.name == name + suffix)
    return out


def engine_view(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """What the engine saw over a run: its steps and tokens per step, and its own TTFT, queue and prefill times
    (means, in ms: from the request's arrival at vLLM's input processing, so the client's TTFT minus this TTFT is
    the time before the engine and after it: HTTP, and for mgpu the gateway, Redis and the worker's pull); for
    mgpu also the mean wait in Redis (enqueue to the worker's start of the request: its queue_ms)."""
    d = {k: after[k] - before[k] for k in _ENGINE}

    def mean_ms(k: str) -> float | None:
        return round(1000 * d[k + "_s"] / d[k + "_n"], 1) if d[k + "_n"] else None

    return {"steps": d["steps"], "tokens_per_step": round(d["step_tokens"] / d["steps"], 1) if d["steps"] else None,
            "ttft_mean_ms": mean_ms("ttft"), "queue_mean_ms": mean_ms("queue"), "prefill_mean_ms": mean_ms("prefill"),
            "redis_queue_mean_ms": mean_ms("redis_queue")}


ENGINE_CPU, REST_CPU = {0}, {1}


def pin(roots: dict[str, int]) -> dict[str, int]:
    """``--pin``: every thread of the engine's own processes (``VLLM::EngineCore`` and its model runner,
    ``VLLM::Worker``) on CPU 0, every other thread of the serving trees (vLLM's API server or mgpu's worker process,
    gateway and redis-server) on CPU 1, where the client runs too: nothing else then takes CPU from the engine,
    so what is left between the targets is how requests reach it and how its tokens come back.  Returns how many
    threads went to each."""
    moved = {"engine": 0, "rest": 0}
    for pid in tree_pids(roots.values()):
        try:
            engine = Path(f"/proc/{pid}/comm").read_text().startswith("VLLM::")
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:  # gone meanwhile
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), ENGINE_CPU if engine else REST_CPU)
                moved["engine" if engine else "rest"] += 1
            except OSError:
                continue
    return moved


def timeline(full: dict[str, Any], slots: int) -> dict[str, Any]:
    """``--timeline``: when each request was sent, got its first token and ended (s from the first send; from
    ``vllm bench serve --save-detailed``), and what the burst shows: the first token of all, the first wave (the
    ``slots`` requests that got their first token first) ending, the rest's first tokens, the last end."""
    t0 = min(full["start_times"])
    sent = [t - t0 for t in full["start_times"]]
    first = [s + f for s, f in zip(sent, full["ttfts"], strict=True)]
    end = [s + lat for s, lat in zip(sent, full["latencies"], strict=True)]
    order = sorted(range(len(sent)), key=first.__getitem__)
    wave, rest = order[:slots], order[slots:]

    def r3(xs: list[float]) -> list[float]:
        return [round(x, 3) for x in xs]

    return {"first_token_s": round(min(first), 3), "first_wave_ends_s": r3([min(end[i] for i in wave),
                                                                            max(end[i] for i in wave)]),
            "rest_first_tokens_s": r3([min(first[i] for i in rest), max(first[i] for i in rest)]) if rest else None,
            "last_end_s": round(max(end), 3), "requests": {"sent_s": r3(sent), "first_token_s": r3(first),
                                                           "end_s": r3(end)}}


def run_client(base_url: str, model_path: str, args: argparse.Namespace, out: Path,
               roots: dict[str, int] | None = None, metrics_url: str | None = None) -> dict[str, Any]:
    """``vllm bench serve`` against ``base_url``; its result JSON, trimmed to the figures we report, and where the
    machine's CPU went meanwhile: each of ``roots`` (a serving process and its children), the client, idle."""
    cmd = [sys.executable, "-c", _CLIENT, "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
           "--base-url", base_url, "--model", model_path, "--served-model-name", MODEL, "--tokenizer", model_path,
           "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
           str(args.output_len), "--num-prompts", str(args.prompts), "--ignore-eos", "--request-rate", "inf",
           "--seed", "0", "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
           *(["--save-detailed"] if args.timeline else [])]
    import resource

    pinned = pin(roots or {}) if args.pin else None
    engine0 = engine_counters(metrics_url) if metrics_url else None
    before, m0 = tree_cpu(roots or {}), machine_cpu()
    client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                   preexec_fn=(lambda: os.sched_setaffinity(0, REST_CPU)) if args.pin else None)
    wall = time.monotonic() - t0
    after, m1 = tree_cpu(roots or {}), machine_cpu()
    client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    full = json.loads(out.read_text())
    res = {k: full.get(k) for k in _KEEP}
    if args.timeline:
        res["timeline"] = timeline(full, args.slots)
    if pinned is not None:
        res["pinned_threads"] = pinned
    if metrics_url and engine0 is not None:
        res["engine"] = engine_view(engine0, engine_counters(metrics_url))
    cores = (m1[0] - m0[0]) / max(1e-9, wall) / os.sysconf("SC_CLK_TCK")
    res["cpu_cores_used"] = {  # cores busy on average over the client's run, by process tree
        **{name: round((after[name] - before[name]) / wall, 3) for name in after},
        "benchmark client": round((client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime)
                                  / wall, 3),
        "machine": round((1 - (m1[1] - m0[1]) / max(1, m1[0] - m0[0])) * cores, 3), "of": round(cores, 1)}
    return res


@contextmanager
def vllm_serve(model_path: str, argv: list[str], tmp: Path,
               kv_cache_gb: int) -> Iterator[tuple[str, dict[str, int], str]]:
    port = free_port()
    log = tmp / f"vllm-serve-{port}.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv, "--host", "127.0.0.1", "--port",
           str(port)]
    p = Proc("vllm-serve", spawn(cmd, env={"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb), "HF_HUB_OFFLINE": "1"},
                                 log_path=log, die_with_parent=True), log, port=port)
    try:
        wait_http_ok(p, f"http://127.0.0.1:{port}/v1/models", 600)
        yield (f"http://127.0.0.1:{port}", {"vllm serve (API server + engine core)": p.proc.pid},
               f"http://127.0.0.1:{port}/metrics")
    finally:
        terminate_all([p.proc], 30)


@contextmanager
def mgpu(model_path: str, settings: dict[str, Any], tmp: Path) -> Iterator[tuple[str, dict[str, int], str]]:
    fleet = Fleet.launch(tmp / "mgpu", die_with_parent=True)
    try:
        w = fleet.start_worker(**{**settings, "model_path": model_path}, timeout=600)
        gw = fleet.start_gateway()
        assert fleet.redis_server.proc is not None
        port = int(fleet.r.hget(fleet.keys.worker(str(w.worker_id)), "metrics_port") or 0)
        yield fleet.base_url, {"mgpu worker (+ engine core)": w.proc.pid, "mgpu gateway": gw.proc.pid,
                               "redis-server": fleet.redis_server.proc.pid}, f"http://127.0.0.1:{port}/metrics"
    finally:
        fleet.stop(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--slots", type=int, default=32, help="mgpu's worker slots: vLLM's --max-num-seqs for both")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gb", type=int, default=2)
    p.add_argument("--no-defaults-run", action="store_true", help="skip vllm serve with vLLM's own defaults")
    p.add_argument("--repeats", type=int, default=1, help="run vllm serve and mgpu (and each --variant) this many "
                   "times each, rotating which goes first (A B, B A, ...); the ratios are per repeat, then their "
                   "median")
    p.add_argument("--variant", action="append", default=[], metavar="SETTING=VALUE",
                   help="one more mgpu target, its worker with this setting (e.g. queue_ahead=0), in every repeat; "
                   "its ratios to vllm serve are reported beside mgpu's")
    p.add_argument("--pin", action="store_true", help="the engine's processes on CPU 0, the rest of each target "
                   "and the client on CPU 1 (see pin()): takes CPU contention out of the comparison")
    p.add_argument("--timeline", action="store_true", help="each request's send, first token and end in the JSON "
                   "(the client's --save-detailed), and the burst's first token, first wave and last end")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        p.error("--pin needs CPUs 0 and 1")
    if args.repeats < 1:
        p.error("--repeats: at least 1")
    variants = {}
    for v in args.variant:
        name, sep, value = v.partition("=")
        if not sep or not name:
            p.error(f"--variant {v!r}: SETTING=VALUE")
        variants[f"mgpu, {name}={value}"] = {name: value}

    from common.settings import WorkerSettings
    from gpu_worker.model_store import default_cache_dir, ensure_embedded_model
    from gpu_worker.serving.vllm import engine_argv

    model_path = str(ensure_embedded_model(default_cache_dir()))
    settings = worker_settings(args)
    argv_same = engine_argv(WorkerSettings.load(settings, env={}), model_path)
    same_name, ours_name = "vllm serve (mgpu's worker flags)", "mgpu: gateway + 1 vLLM worker"
    runs: dict[str, Any] = {}
    pairs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mgpu-vllmbench-") as d:
        tmp = Path(d)
        servers: dict[str, Any] = {same_name: lambda: vllm_serve(model_path, argv_same, tmp, args.kv_cache_gb),
                                   ours_name: lambda: mgpu(model_path, settings, tmp)}
        for vname, extra in variants.items():
            servers[vname] = lambda extra=extra: mgpu(model_path, {**settings, **extra}, tmp)
        if not args.no_defaults_run:
            servers["vllm serve (vLLM's defaults)"] = lambda: vllm_serve(
                model_path, ["--model", model_path, "--served-model-name", MODEL, "--max-model-len",
                             str(args.max_model_len)], tmp, args.kv_cache_gb)
        rotated = [same_name, ours_name, *variants]  # each repeat starts one further along: no fixed order
        for rep in range(args.repeats):
            k = rep % len(rotated)
            names = rotated[k:] + rotated[:k]
            if rep == 0:
                names += [n for n in servers if n not in rotated]
            pair: dict[str, Any] = {"order": names[:len(rotated)]}
            for i, name in enumerate(names):
                t0 = time.monotonic()
                with servers[name]() as (url, roots, metrics_url):
                    started = time.monotonic() - t0
                    pair[name] = {"start_s": round(started, 1),
                                  **run_client(url, model_path, args, tmp / f"r{rep}-{i}.json", roots, metrics_url)}
                print(f"[{rep + 1}/{args.repeats}] {name}: {json.dumps(pair[name])}", flush=True)
                runs.setdefault(name, pair[name])
            pair["ratios"] = _ratios(pair[ours_name], pair[same_name])
            for vname in variants:
                pair["ratios"].update({f"{key} ({vname})": v for key, v in
                                       _ratios(pair[vname], pair[same_name]).items()})
            pairs.append(pair)
    expected = args.prompts * args.output_len
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} cores, no GPU",
        "workload": {"prompts": args.prompts, "input_len": args.input_len, "output_len": args.output_len,
                     "expected_output_tokens": expected, "engine_flags": argv_same[4:]},
        "runs": runs,
        "ratios": {k: round(statistics.median(p["ratios"][k] for p in pairs), 3) for k in pairs[0]["ratios"]},
    }
    if args.repeats > 1:
        report["pairs"] = pairs
        report["ratio_range"] = {k: [min(p["ratios"][k] for p in pairs), max(p["ratios"][k] for p in pairs)]
                                 for k in pairs[0]["ratios"]}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    bad = sorted({n for p in pairs for n, r in p.items() if isinstance(r, dict) and "failed" in r
                  and (r["failed"] or r["total_output_tokens"] != expected)})
    if bad:
        print(f"FAILED: {bad} did not generate exactly {expected} tokens with 0 failures", file=sys.stderr)
        return 1
    return 0


def _ratios(ours: dict[str, Any], same: dict[str, Any]) -> dict[str, float]:
    return {"output_throughput": round(ours["output_throughput"] / same["output_throughput"], 3),
            "median_ttft": round(ours["median_ttft_ms"] / same["median_ttft_ms"], 3),
            "median_itl": round(ours["median_itl_ms"] / same["median_itl_ms"], 3)}


if __name__ == "__main__":
    sys.exit(main())
