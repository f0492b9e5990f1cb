"""A real Prometheus server scrapes the gateway and two sim workers during a short load; PromQL
over its HTTP API must give back what the load implies."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.procs import free_port, spawn, terminate, wait_until
from ops.targets import TargetsWriter
from tests.conftest import ROOT, Stack

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="the `prometheus` binary is not installed "
                                "(bash ops/setup.sh test installs it with apt)")

MODEL = "sim-model"
SLOTS = 2
DECODE_MS = 20
MAX_TOKENS = 8
N_PLAIN, N_STREAM, CONCURRENCY = 60, 20, 12
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)  # the worker's


class Prometheus:
    def __init__(self, tmp: Path, gateway: str, targets: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rules = ROOT / "ops" / "prometheus" / "rules"
        cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
               "rule_files": [str(rules / "recording.yml"), str(rules / "alerts.yml")],
               "scrape_configs": [
                   {"job_name": "mgpu-gateway", "static_configs": [{"targets": [gateway]}]},
                   {"job_name": "mgpu-worker", "file_sd_configs": [{"files": [str(targets)],
                                                                     "refresh_interval": "1s"}]}]}
        conf = tmp / "prometheus.yml"
        conf.write_text(json.dumps(cfg))  # JSON is YAML
        self.log = tmp / "prometheus.log"
        assert PROMETHEUS is not None
        self.proc = spawn([PROMETHEUS, f"--config.file={conf}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                           f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"], log_path=self.log)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            try:
                return httpx.get(self.url + "/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, "prometheus ready")

    def query(self, q: str) -> list[dict[str, Any]]:
        with httpx.Client(timeout=5) as c:
            r = c.get(self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": q}))
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]  # type: ignore[no-any-return]

    def by(self, q: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(q)}

    def scalar(self, q: str) -> float | None:
        res = self.query(q)
        return float(res[0]["value"][1]) if res else None

    def stop(self) -> None:
        terminate(self.proc, timeout=10)


def _ceiling(seconds: float) -> float:
    return next(b for b in BUCKETS if b >= seconds)


def test_prometheus_scrapes_load(stack: Stack, tmp_path: Path) -> None:
    workers = [stack.start_worker(model=MODEL, gpu=g, slots=SLOTS, sim_decode_ms=DECODE_MS,
                                  sim_decode_ms_per_seq=0, sim_prefill_ms_per_token=0) for g in (0, 1)]
    gw = stack.start_gateway(queue_metrics_interval_s=0.25)
    targets = tmp_path / "targets" / "workers.json"
    assert TargetsWriter(targets, stack.keys).refresh(stack.r)
    addrs = json.loads(targets.read_text())[0]["targets"]
    assert len(addrs) == 2
    prom = Prometheus(tmp_path, f"127.0.0.1:{gw.port}", targets)
    try:
        def all_up() -> bool:
            up = prom.by("up", "instance")
            return len(up) == 3 and all(v == 1 for v in up.values())

        wait_until(all_up, 20, "3 targets up")

        latencies: list[float] = []

        def one(i: int) -> None:
            stream = i % 4 == 0 and i // 4 < N_STREAM
            t0 = time.perf_counter()
            if stream:
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}],
                        "max_tokens": MAX_TOKENS, "stream": True}
                with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
                    assert r.status_code == 200
                    assert any(ln == "data: [DONE]" for ln in r.iter_lines())
            else:
                r = httpx.post(stack.base_url + "/v1/completions", timeout=60,
                               json={"model": MODEL, "prompt": f"p {i}", "max_tokens": MAX_TOKENS})
                assert r.status_code == 200, r.text
            latencies.append(time.perf_counter() - t0)

        n = N_PLAIN + N_STREAM
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, range(n)))
        assert len(latencies) == n

        # every request reached Prometheus: wait on the scraped totals, then compare exactly
        wait_until(lambda: prom.scalar('sum(mgpu_worker_requests_total{status="success"})') == n, 20,
                   "the last requests scraped")
        wait_until(lambda: prom.scalar('sum(mgpu_gateway_requests_total{status="success"})') == n, 20,
                   "gateway totals scraped")
        per_worker = prom.by('sum by (worker) (mgpu_worker_requests_total{status="success"})', "worker")

        def served_now() -> dict[str | None, int]:  # the registry's counters, refreshed by the heartbeat
            return {w.worker_id: int(stack.r.hget(stack.keys.worker(w.worker_id or ""), "served") or 0)
                    for w in workers}

        wait_until(lambda: sum(served_now().values()) == n, 10, "registry counters")
        served = served_now()
        assert per_worker == {k: float(v) for k, v in served.items()}
        assert sum(per_worker.values()) == n and all(v > 0 for v in per_worker.values())
        assert prom.scalar('sum(mgpu_worker_requests_total{status!="success"})') == 0
        assert set(prom.by("sum by (gpu) (mgpu_worker_requests_total)", "gpu")) == {"0", "1"}
        assert prom.by("sum by (endpoint) (mgpu_gateway_requests_total)", "endpoint") == {
            "completions": N_PLAIN, "chat": N_STREAM}

        # tokens and histogram counts are exact
        assert prom.scalar("sum(mgpu_worker_generation_tokens_total)") == n * MAX_TOKENS
        assert prom.scalar("sum(mgpu_worker_time_to_first_token_seconds_count)") == n
        assert prom.scalar("sum(mgpu_worker_queue_wait_seconds_count)") == n
        assert prom.scalar("sum(mgpu_gateway_time_to_first_token_seconds_count)") == N_STREAM

        # p99 latency per worker: above the engine's floor (MAX_TOKENS decode steps), at most the
        # bucket that holds the slowest request the clients saw
        floor = MAX_TOKENS * DECODE_MS / 1000
        p99 = prom.by("histogram_quantile(0.99, sum by (worker, le) (mgpu_worker_request_duration_seconds_bucket))",
                      "worker")
        assert set(p99) == set(served)
        for v in p99.values():
            assert 0.1 <= v <= _ceiling(max(latencies)), (v, max(latencies))
        rec = prom.by("worker:mgpu_worker_request_duration_seconds:p99_5m", "worker")
        assert set(rec) == set(served) and all(0.1 <= v <= _ceiling(max(latencies)) for v in rec.values())

        # time to first token: at least one decode step, below the end-to-end latency
        ttft = prom.scalar("histogram_quantile(0.5, sum by (le) (mgpu_worker_time_to_first_token_seconds_bucket))")
        e2e = prom.scalar("histogram_quantile(0.5, sum by (le) (mgpu_worker_request_duration_seconds_bucket))")
        assert ttft is not None and e2e is not None
        assert DECODE_MS / 1000 <= ttft < e2e and e2e >= floor
        itl = prom.scalar("histogram_quantile(0.5, sum by (le) (mgpu_worker_inter_token_latency_seconds_bucket))")
        assert itl is not None and 0.01 <= itl <= 0.05  # one decode step: 20 ms (plus scheduling)

        # slots: saturated during the load (12 clients, 2 x 2 slots), idle after it
        busy = prom.by("max_over_time(mgpu_worker_busy_slots[2m])", "worker")
        assert busy == {w: float(SLOTS) for w in served}
        assert prom.by("mgpu_worker_slots", "worker") == {w: float(SLOTS) for w in served}
        wait_until(lambda: prom.scalar("sum(mgpu_worker_busy_slots)") == 0, 10, "slots idle")
        assert prom.scalar("max(max_over_time(worker:mgpu_worker_slot_occupancy:ratio[2m]))") == 1.0

        # the queue held waiting requests (never more than the clients had in flight), then drained
        stream = stack.keys.stream(MODEL)
        qmax = prom.scalar(f'max_over_time(mgpu_queue_length{{stream="{stream}"}}[2m])')
        assert qmax is not None and 1 <= qmax <= CONCURRENCY
        lag_max = prom.scalar(f'max_over_time(mgpu_queue_lag{{stream="{stream}"}}[2m])')
        assert lag_max is not None and 1 <= lag_max <= CONCURRENCY - 2 * SLOTS
        wait_until(lambda: prom.scalar(f'mgpu_queue_length{{stream="{stream}"}}') == 0, 10, "queue empty")
        assert prom.scalar(f'mgpu_dead_letter_length{{model="{MODEL}"}}') == 0
        assert prom.by("mgpu_gateway_live_workers", "model") == {MODEL: 2.0}
        assert prom.scalar("count(ALERTS{alertstate=\"firing\"})") is None  # nothing fires on a healthy load
    finally:
        prom.stop()
