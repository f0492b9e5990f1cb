"""``mgpu up``: the whole service on one machine, supervised.

It starts a redis-server of its own (AOF on) unless ``MGPU_REDIS_URL`` / ``--redis-url`` names one,
converts the embedded model once, starts one worker per visible GPU (or ``--workers N`` CPU
workers), starts the gateway, restarts crashed workers with exponential backoff, leaves a
crash-looping worker down (5 crashes within 60 s), and shuts everything down on Ctrl+C/SIGTERM.

For Prometheus it keeps ``<data_dir>/prometheus/workers.json`` (file_sd targets: every worker's
``/metrics``, from the registry) and ``<data_dir>/prometheus/gateway.json`` up to date.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis

from common.settings import Settings
from ops.procs import RedisServer, free_port, mgpu_cmd, spawn, terminate
from ops.targets import TargetsWriter, static_targets, write_json_atomic

log = logging.getLogger("mgpu.up")

CRASH_LOOP_N = 5
CRASH_LOOP_WINDOW_S = 60.0


def visible_gpus() -> list[int]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return list(range(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no driver: a CPU host
        return []


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    crashes: list[float] = field(default_factory=list)
    restart_at: float = 0.0
    down: bool = False

    def start(self) -> None:
        self.proc = spawn(self.args, env=self.env, log_path=self.log_path, die_with_parent=True)

    def on_exit(self, now: float) -> float | None:
        """Record an exit: the delay before the restart (exponential backoff, 0.5 s doubling up to
        30 s), or None when it crash-loops (``CRASH_LOOP_N`` exits within ``CRASH_LOOP_WINDOW_S``)."""
        self.crashes = [t for t in self.crashes if now - t < CRASH_LOOP_WINDOW_S] + [now]
        if len(self.crashes) >= CRASH_LOOP_N:
            self.down = True
            return None
        return min(30.0, 0.5 * 2 ** (len(self.crashes) - 1))


def _settings_env(s: Settings, **extra: str) -> dict[str, str]:
    env = {"MGPU_" + k.upper(): str(v) for k, v in s.model_dump().items()
           if v is not None and k not in ("gateway_id", "worker_id", "gpu")}
    env.update(extra)
    return env


def run_up(s: Settings, *, explicit_redis: bool = False) -> int:
    data = Path(s.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    (data / "logs").mkdir(exist_ok=True)
    redis_server: RedisServer | None = None
    if not explicit_redis and not os.environ.get("MGPU_REDIS_URL"):
        redis_server = RedisServer(data / "redis").start()
        s = s.model_copy(update={"redis_url": redis_server.url})
        log.info("redis-server (AOF) on %s, data in %s", redis_server.url, data / "redis")
    if s.engine == "vllm" and not s.model_path:
        from gpu_worker.model_store import ensure_embedded_model

        log.info("preparing the embedded model (converted once, then cached)")
        s = s.model_copy(update={"model_path": str(ensure_embedded_model(Path(s.model_cache_dir)))})
    gpus = visible_gpus()
    children: list[Child] = []
    if gpus:
        log.info("found %d GPU(s): one worker each", len(gpus))
        for g in gpus:
            children.append(Child(f"worker-gpu{g}", mgpu_cmd("worker"),
                                  _settings_env(s, MGPU_GPU=str(g), CUDA_VISIBLE_DEVICES=str(g),
                                                MGPU_WORKER_ID=f"{os.uname().nodename}-gpu{g}"),
                                  data / "logs" / f"worker-gpu{g}.log"))
    else:
        log.info("no GPU found: %d CPU worker(s)", s.workers)
        for i in range(s.workers):
            extra = {"MGPU_WORKER_ID": f"{os.uname().nodename}-cpu{i}"}
            if s.engine == "vllm":
                extra["MGPU_VLLM_ENFORCE_EAGER"] = "true"
            children.append(Child(f"worker-cpu{i}", mgpu_cmd("worker"), _settings_env(s, **extra),
                                  data / "logs" / f"worker-cpu{i}.log"))
    port = s.port or free_port()
    gateway = Child("gateway", mgpu_cmd("gateway"), _settings_env(s, MGPU_PORT=str(port)),
                    data / "logs" / "gateway.log")
    children.append(gateway)
    stop = threading.Event()

    def on_signal(_sig: int, _frm: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for c in children:
        c.start()
    base = f"http://{s.host}:{port}"
    announced = False
    started = time.monotonic()
    prom_dir = data / "prometheus"
    write_json_atomic(prom_dir / "gateway.json", static_targets([f"{s.host}:{port}"], namespace=s.namespace))
    targets = TargetsWriter(prom_dir / "workers.json", s.keys)
    registry = redis.Redis.from_url(s.redis_url, socket_timeout=2, socket_connect_timeout=2)
    next_targets = 0.0
    try:
        while not stop.wait(0.25):
            now = time.monotonic()
            if now >= next_targets:
                next_targets = now + 2.0
                try:
                    targets.refresh(registry)
                except (redis.RedisError, OSError) as exc:
                    log.warning("could not refresh Prometheus targets: %s", exc)
            for c in children:
                if c.down or c.proc is None:
                    continue
                rc = c.proc.poll()
                if rc is None:
                    continue
                if c.restart_at == 0.0:
                    delay = c.on_exit(now)
                    if delay is None:
                        log.error("%s crash-loops (%d exits in %.0fs): left down; see %s", c.name,
                                  len(c.crashes), CRASH_LOOP_WINDOW_S, c.log_path)
                        _report_down(s, c)
                        continue
                    c.restart_at = now + delay
                    log.warning("%s exited with %s; restarting in %.1fs", c.name, rc, delay)
                elif now >= c.restart_at:
                    c.restart_at = 0.0
                    c.start()
            if not announced and _ready(base):
                announced = True
                print(f"\nmgpu is up in {now - started:.0f}s: {base}/v1  (model: {s.model})\n"
                      f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
                      f"-d '{{\"model\": \"{s.model}\", \"messages\": [{{\"role\": \"user\", "
                      f"\"content\": \"Hello!\"}}]}}'\n  logs: {data / 'logs'}   stop: Ctrl+C\n", flush=True)
    finally:
        log.info("shutting down")
        for c in children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        for c in children:
            if c.proc is not None:
                terminate(c.proc, timeout=s.drain_grace_s + 5)
        registry.close()
        if redis_server is not None:
            redis_server.stop()
    return 0


def _report_down(s: Settings, c: Child) -> None:
    """Show a crash-looping worker in the registry (and so in /workers) as state 'crashloop'."""
    wid = c.env.get("MGPU_WORKER_ID")
    if not wid:
        return
    import redis

    try:
        r = redis.Redis.from_url(s.redis_url, socket_timeout=2)
        key = s.keys.worker(wid)
        r.hset(key, mapping={"id": wid, "state": "crashloop", "model": s.model, "slots": "0", "in_flight": "0",
                             "heartbeat": "0", "exits": str(len(c.crashes)), "log": str(c.log_path)})
        r.expire(key, 3600)
        r.sadd(s.keys.workers, wid)
    except redis.RedisError as exc:
        log.warning("could not report %s as down: %s", c.name, exc)


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/ready", timeout=1) as r:
            return bool(r.status == 200)
    except Exception:
        return False
