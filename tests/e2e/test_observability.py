"""Observability: metric endpoints, NVML readings (fake NVML), queue gauges, file_sd targets,
Prometheus rules, the Grafana dashboard, request ids in logs, the multiprocess gateway and
``mgpu status``."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from common.keys import GROUP, Keys
from common.queues import read_queues
from gpu_worker.nvml import Gpu
from ops import dashboard
from ops.procs import RedisServer, free_port, mgpu_cmd, spawn, terminate, wait_until
from ops.targets import TargetsWriter
from tests.conftest import ROOT, Stack, http_get

PROM_DIR = ROOT / "ops" / "prometheus"
MODEL = "sim-model"


# ----------------------------------------------------------------------------- fake NVML


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"nvml error {value}")
        self.value = value


def fake_nvml(*, ecc: bool = True, xids: list[int] | None = None, init_fails: bool = False) -> Any:
    events = list(xids or [])

    def not_supported(*_a: Any) -> Any:
        raise FakeNVMLError(3)

    def init() -> None:
        if init_fails:
            raise FakeNVMLError(9)  # driver not loaded

    def wait(_es: Any, timeout_ms: int) -> Any:
        if events:
            return SimpleNamespace(eventData=events.pop(0))
        time.sleep(timeout_ms / 1000 / 50)
        raise FakeNVMLError(10)

    return SimpleNamespace(
        NVMLError=FakeNVMLError, NVML_ERROR_TIMEOUT=10, NVML_TEMPERATURE_GPU=0,
        NVML_MEMORY_ERROR_TYPE_CORRECTED=0, NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1, NVML_VOLATILE_ECC=0,
        nvmlEventTypeXidCriticalError=8,
        nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlSystemGetDriverVersion=lambda: "550.1",
        nvmlDeviceGetHandleByIndex=lambda i: ("h", i),
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetUUID=lambda h: f"GPU-{h[1]}",
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=87, memory=40),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=30 << 30, total=80 << 30, free=50 << 30),
        nvmlDeviceGetTemperature=lambda h, kind: 64,
        nvmlDeviceGetPowerUsage=lambda h: 350_500,
        nvmlDeviceGetEnforcedPowerLimit=not_supported,
        nvmlDeviceGetTotalEccErrors=(lambda h, kind, counter: 5 if kind == 0 else 1) if ecc else not_supported,
        nvmlEventSetCreate=lambda: "es", nvmlDeviceRegisterEvents=lambda h, kinds, es: None,
        nvmlEventSetWait_v2=wait, nvmlEventSetFree=lambda es: None,
    )


def read_gpu(nvml: Any, index: int) -> Any:
    return Gpu(index, nvml).read()


def test_read_gpu_with_fake_nvml() -> None:
    r = read_gpu(fake_nvml(), 1)
    assert (r.index, r.name, r.uuid) == (1, "NVIDIA H100 80GB HBM3", "GPU-1")
    assert (r.utilization_ratio, r.memory_utilization_ratio) == (0.87, 0.40)
    assert (r.memory_used_bytes, r.memory_total_bytes) == (30 << 30, 80 << 30)
    assert (r.temperature_celsius, r.power_watts) == (64.0, 350.5)
    assert r.power_limit_watts is None  # not supported: absent, not zero
    assert (r.ecc_corrected_total, r.ecc_uncorrected_total) == (5, 1)
    assert read_gpu(fake_nvml(ecc=False), 0).ecc_uncorrected_total is None
    json.dumps(r.as_dict())  # the probe prints it


def test_gpu_sampler_counts_xid_events_and_is_absent_without_nvml(caplog: pytest.LogCaptureFixture) -> None:
    s = Gpu(0, fake_nvml(xids=[79, 48]))
    try:
        wait_until(lambda: s.read() is not None and s.xid_errors_total == 2, 5, "two XID events counted")
        r = s.read()
        assert r is not None and (r.xid_errors_total, r.last_xid) == (2, 48)
    finally:
        s.close()
    caplog.clear()
    with caplog.at_level("INFO", logger="mgpu.gpu"):
        none = Gpu(0, fake_nvml(init_fails=True))
    assert not none.available and none.read() is None
    assert len([r for r in caplog.records if r.name == "mgpu.gpu"]) == 1  # one log line, nothing else


def test_gpu_probe_cli_prints_json() -> None:
    out = subprocess.run([sys.executable, "-m", "gpu_worker.nvml"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    obj = json.loads(out.stdout)
    assert "gpus" in obj and (obj["gpus"] or obj["error"])  # no GPU here: an explanation instead


def _gpu_metric_names() -> set[str]:
    """The names the worker's GPU collector exports (fake NVML: this machine has no GPU)."""
    from gpu_worker.metrics import _GpuCollector

    m = SimpleNamespace(label_values=["m", "w", "0"])
    sampler = Gpu(0, fake_nvml(xids=[13]))
    try:
        wait_until(lambda: sampler.read() is not None and sampler.xid_errors_total == 1, 5, "xid")
        reg = CollectorRegistry()
        reg.register(_GpuCollector(m, sampler))  # type: ignore[arg-type]
        return {s.name for fam in reg.collect() for s in fam.samples}
    finally:
        sampler.close()


# ----------------------------------------------------------------------------- queues and targets


async def _queue_state(url: str, keys: Keys) -> Any:
    r = aioredis.Redis.from_url(url)
    try:
        return await read_queues(r, keys, ["m", "absent"])
    finally:
        await r.aclose()


def test_queue_gauges_from_redis(redis_server: RedisServer) -> None:
    keys = Keys("tq")
    r = redis.Redis.from_url(redis_server.url)
    stream = keys.stream("m")
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    now_ms = int(time.time() * 1000)
    for i in range(5):  # enqueued 10s, 9s, ... ago
        r.xadd(stream, {"p": "x"}, id=f"{now_ms - (10 - i) * 1000}-0")
    r.xreadgroup(GROUP, "c1", {stream: ">"}, count=2)  # two in progress
    r.xadd(keys.dlq("m"), {"p": "bad"})
    qs = asyncio.run(_queue_state(redis_server.url, keys))
    assert [mq.model for mq in qs] == ["m", "absent"]
    m, absent = qs
    assert m.dead_letters == 1 and absent.dead_letters == 0 and absent.streams == []
    (q,) = m.streams
    assert (q.stream, q.length, q.lag, q.pending, q.consumers) == (stream, 5, 3, 2, 1)
    assert 7.5 <= q.oldest_waiting_age_s <= 12  # the third entry: 8 s old
    assert 9.5 <= q.oldest_pending_age_s <= 14  # the first one: 10 s old


def test_targets_writer_keeps_vanished_workers_for_a_while(redis_server: RedisServer, tmp_path: Path) -> None:
    keys = Keys("tt")
    r = redis.Redis.from_url(redis_server.url)
    for wid, port in (("a", 9001), ("b", 9002), ("c", 0)):  # c has no metrics server yet
        r.hset(keys.worker(wid), mapping={"metrics_host": "10.0.0.1", "metrics_port": str(port)})
        r.sadd(keys.workers, wid)
    path = tmp_path / "prom" / "workers.json"
    w = TargetsWriter(path, keys, keep_s=60)
    assert w.refresh(r, now=0)
    assert json.loads(path.read_text()) == [{"targets": ["10.0.0.1:9001", "10.0.0.1:9002"],
                                             "labels": {"namespace": "tt"}}]
    assert not w.refresh(r, now=1)  # unchanged: not rewritten
    r.delete(keys.worker("b"))
    r.srem(keys.workers, "b")
    r.hset(keys.worker("a"), "metrics_port", "9005")  # a restarted on another port: replaced
    assert w.refresh(r, now=30)
    assert json.loads(path.read_text())[0]["targets"] == ["10.0.0.1:9002", "10.0.0.1:9005"]
    assert w.refresh(r, now=91)  # b vanished over a minute ago: dropped
    assert json.loads(path.read_text())[0]["targets"] == ["10.0.0.1:9005"]


def test_mgpu_up_writes_prometheus_targets(tmp_path: Path, redis_server: RedisServer) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = {"MGPU_REDIS_URL": redis_server.url, "MGPU_NAMESPACE": "tu", "PYTHONPATH": str(ROOT)}
    p = spawn(mgpu_cmd("up", "--engine", "sim", "--workers", "2", "--port", str(port), "--data-dir", str(data)),
              env=env, log_path=tmp_path / "up.log", cwd=str(ROOT))
    workers = data / "prometheus" / "workers.json"
    try:
        def two() -> bool:
            if p.poll() is not None:
                raise AssertionError((tmp_path / "up.log").read_text()[-3000:])
            try:
                return len(json.loads(workers.read_text())[0]["targets"]) == 2
            except (OSError, ValueError, IndexError):
                return False

        wait_until(two, 60, "two worker targets")
        for addr in json.loads(workers.read_text())[0]["targets"]:
            code, health = http_get(f"http://{addr}/health")
            assert code == 200 and health["state"] == "ready"
            assert "mgpu_worker_slots" in httpx.get(f"http://{addr}/metrics", timeout=2).text
        assert json.loads((data / "prometheus" / "gateway.json").read_text())[0]["targets"] == [f"127.0.0.1:{port}"]
    finally:
        terminate(p, timeout=30)


# ----------------------------------------------------------------------------- Prometheus rules, dashboard

PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="`promtool` (Debian package prometheus) is not installed")
def test_promtool_checks_config_and_rules() -> None:
    assert PROMTOOL is not None
    rules = sorted(str(p) for p in (PROM_DIR / "rules").glob("*.yml"))
    for args in (["check", "config", str(PROM_DIR / "prometheus.yml")],
                 ["check", "config", str(PROM_DIR / "prometheus-compose.yml")],
                 ["check", "rules", *rules],
                 ["test", "rules", str(PROM_DIR / "tests" / "alerts_test.yml")]):
        out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}\n{out.stderr}"


def recording_rule_names() -> set[str]:
    return set(re.findall(r"^\s*- record:\s*(\S+)", (PROM_DIR / "rules" / "recording.yml").read_text(), re.M))


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (enough PromQL for our queries)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        after = e[m.end():].lstrip()
        if after.startswith("(") or m.group(0) in _PROMQL_WORDS:
            continue  # a function or a keyword
        if m.start() > 0 and (e[m.start() - 1].isdigit() or e[m.start() - 1] == "."):
            continue  # 1e3, 0.5
        names.add(m.group(0))
    return names


def test_promql_name_extraction() -> None:
    assert promql_metric_names('histogram_quantile(0.99, sum by (worker, le) (rate(x_bucket{a="b(c)"}[$__rate_'
                               'interval]))) / on (worker) group_left y > bool 1e3') == {"x_bucket", "y"}


def _scraped_names(url: str) -> set[str]:
    text = httpx.get(url, timeout=5).text
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_dashboard_is_valid_and_queries_only_exported_metrics(stack: Stack) -> None:
    # the committed dashboard is the generator's output
    committed = (ROOT / "ops" / "grafana" / "dashboards" / "mgpu.json").read_text()
    assert committed == dashboard.render(), "run: python -m ops.dashboard"
    d = json.loads(committed)
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "model", "worker"}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    exprs = []
    for p in d["panels"]:
        assert {"type", "title", "gridPos"} <= set(p)
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat") and p["targets"]
        for t in p["targets"]:
            assert t["refId"] and t["expr"] and t["datasource"]["type"] == "prometheus"
            exprs.append(t["expr"])
    titles = " ".join(p["title"] for p in d["panels"])
    for needed in ("Requests/s", "p50 / p95 / p99", "first token", "GPU utilisation", "Slot occupancy",
                   "Queue depth", "Error rate", "Worker states"):
        assert needed in titles
    prov = (ROOT / "ops" / "grafana" / "provisioning")
    assert "type: prometheus" in (prov / "datasources" / "prometheus.yml").read_text()
    assert "uid: prometheus" in (prov / "datasources" / "prometheus.yml").read_text()
    assert "type: file" in (prov / "dashboards" / "mgpu.yml").read_text()

    # every metric a query names is exported by a live gateway or worker, the GPU collector, or a rule
    w = stack.start_worker(model=MODEL, sim_decode_ms=1)
    stack.start_gateway(queue_metrics_interval_s=0.2)
    c = stack.openai()
    c.completions.create(model=MODEL, prompt="x", max_tokens=3)
    list(c.completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True))
    port = int(stack.r.hget(stack.keys.worker(w.worker_id or ""), "metrics_port") or 0)
    wait_until(lambda: "mgpu_queue_length" in httpx.get(stack.base_url + "/metrics").text, 10, "queue gauges")
    # a batch in progress: its gauges exist while it is fed (the batch panels and the expiry alert read them)
    lines = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": MODEL, "prompt": "x", "max_tokens": 200}}) + "\n" for i in range(400))
    f = c.files.create(file=("b.jsonl", lines.encode()), purpose="batch")
    c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    wait_until(lambda: "mgpu_gateway_batch_expires_in_seconds{" in httpx.get(stack.base_url + "/metrics").text, 20,
               "batch gauges")
    exported = (_scraped_names(stack.base_url + "/metrics") | _scraped_names(f"http://127.0.0.1:{port}/metrics")
                | _gpu_metric_names() | recording_rule_names() | {"up"})
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"
    # and so does every rule expression
    rule_exprs = re.findall(r"expr:\s*(\|\n(?:\s{10}.*\n)+|.*)", "".join(
        (PROM_DIR / "rules" / f).read_text() for f in ("recording.yml", "alerts.yml")))
    used_by_rules = set().union(*(promql_metric_names(e) for e in rule_exprs))
    assert used_by_rules <= exported, f"rules use unexported: {sorted(used_by_rules - exported)}"


# ----------------------------------------------------------------------------- logs, processes, status


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for ln in text.splitlines():
        if ln.startswith("{"):
            try:
                out.append(json.loads(ln))
            except ValueError:
                pass
    return out


def test_request_id_in_gateway_and_worker_json_logs(stack: Stack) -> None:
    w = stack.start_worker(model=MODEL, sim_decode_ms=1, log_json=True)
    gw = stack.start_gateway(log_json=True)
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3},
                   headers={"X-Request-Id": "req-log-42"}, timeout=10)
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-log-42"  # the client's tracing id, echoed
    rid = r.json()["id"]
    assert rid != "req-log-42"  # the request's own id is the gateway's
    bad = httpx.post(stack.base_url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 10**6},
                     headers={"X-Request-Id": "req-log-43"}, timeout=10)
    assert bad.status_code == 400

    def lines(p: Any, trace: str) -> list[dict[str, Any]]:
        return [x for x in _json_lines(p.output()) if x.get("trace_id") == trace]

    wait_until(lambda: lines(gw, "req-log-42") and lines(w, "req-log-42"), 10, "request log lines")
    (g,) = lines(gw, "req-log-42")
    assert (g["msg"], g["outcome"], g["code"], g["model"], g["request_id"]) == (
        "request done", "success", 200, MODEL, rid)
    (wl,) = lines(w, "req-log-42")
    assert (wl["msg"], wl["outcome"], wl["worker"], wl["completion_tokens"], wl["request_id"]) == (
        "request finished", "success", w.worker_id, 3, rid)
    wait_until(lambda: lines(gw, "req-log-43"), 10, "the rejected request's line")
    assert lines(gw, "req-log-43")[0]["outcome"] == "client_error"
    # the timings: the worker's from the gateway's enqueue (to its start, its first token, its end); a stream's
    # time to first token at the gateway too
    assert 0 <= wl["queue_ms"] <= wl["ttft_ms"] <= wl["total_ms"] and MODEL in wl["stream"]
    assert "ttft_ms" not in g  # not a stream
    with httpx.stream("POST", stack.base_url + "/v1/completions", timeout=10, headers={"X-Request-Id": "req-log-44"},
                      json={"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}) as s:
        assert s.status_code == 200 and "[DONE]" in s.read().decode()
    wait_until(lambda: lines(gw, "req-log-44") and lines(w, "req-log-44"), 10, "the stream's log lines")
    (g,) = lines(gw, "req-log-44")
    assert 0 < g["ttft_ms"] <= g["duration_ms"]
    assert lines(w, "req-log-44")[0]["ttft_ms"] <= lines(w, "req-log-44")[0]["total_ms"]


def test_multiprocess_gateway_counts_add_up(stack: Stack) -> None:
    stack.start_worker(model=MODEL, sim_decode_ms=1, slots=64)
    mp_dir = stack.tmp / "multiproc"
    stack.start_gateway(gateway_procs=2, PROMETHEUS_MULTIPROC_DIR=str(mp_dir))
    sent = 0

    def burst(k: int) -> None:
        def one(i: int) -> None:
            with httpx.Client(timeout=10) as c:  # a connection each: the kernel spreads them over the processes
                r = c.post(stack.base_url + "/v1/completions",
                           json={"model": MODEL, "prompt": f"x {i}", "max_tokens": 2})
                assert r.status_code == 200

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(k)))

    def reply_streams() -> dict[str, int]:
        keys = [k.decode() for k in stack.r.scan_iter(match=stack.keys.replies("*", ""))]
        return {k: int(stack.r.xinfo_stream(k)["entries-added"]) for k in keys}

    while len([n for n in reply_streams().values() if n]) < 2:  # until both processes served some
        assert sent < 400, f"one process got every request: {reply_streams()}"
        burst(40)
        sent += 40
    assert len(reply_streams()) == 2  # two processes, one reply stream each
    for _ in range(6):  # whichever process answers the scrape, the counts are the sum over both
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(stack.base_url + "/metrics").text)}
        total = sum(s.value for s in fams["mgpu_gateway_requests"].samples if s.name.endswith("_total"))
        count = sum(s.value for s in fams["mgpu_gateway_request_duration_seconds"].samples
                    if s.name.endswith("_count"))
        assert total == sent and count == sent
        assert fams["mgpu_gateway_live_workers"].samples[0].value == 1
    assert len(list(mp_dir.glob("counter_*.db"))) == 2


def test_status_once_shows_workers_and_queues(stack: Stack) -> None:
    w = stack.start_worker(model=MODEL, gpu=3, slots=2, sim_decode_ms=30, sim_decode_ms_per_seq=0)
    stack.start_gateway()
    stop = threading.Event()

    def client(i: int) -> None:  # each keeps one request in flight: 6 clients, 2 slots, never idle
        while not stop.is_set():
            httpx.post(stack.base_url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": f"x {i}", "max_tokens": 10})

    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for c in clients:
        c.start()
    try:
        wait_until(lambda: int(stack.r.hget(stack.keys.worker(w.worker_id or ""), "served") or 0) >= 6, 20,
                   "some requests served")
        out = subprocess.run([*mgpu_cmd("status", "--once", "--no-color", "--interval", "1")], cwd=ROOT, timeout=30,
                             capture_output=True, text=True, env={**stack.env({}), "PATH": "/usr/bin:/bin"})
    finally:
        stop.set()
        for c in clients:
            c.join()
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "\x1b[" not in text
    row = next(ln for ln in text.splitlines() if ln.startswith(w.worker_id or "?"))
    cells = row.split()
    assert cells[1:4] == ["ready", "3", MODEL]
    assert cells[5] in ("1/2", "2/2")  # busy slots under load
    rate = float(cells[7])
    # 2 slots / (10 tokens x 30 ms) = ~6.7 req/s; the served counter reaches Redis with each heartbeat (0.5 s)
    assert 2 <= rate <= 12
    qrow = next(ln for ln in text.splitlines() if ln.startswith(MODEL + " "))
    q = qrow.split()
    assert q[1] == stack.keys.stream(MODEL) and int(q[2]) >= 1 and q[-1] == "0"
