"""Fixtures: a real redis-server per test (on a free port, killable) and mgpu processes on it."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from common.keys import Keys
from ops.procs import RedisServer, free_port, mgpu_cmd, spawn, terminate, wait_until

ROOT = Path(__file__).resolve().parent.parent


def http_get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    """Until the gateway on ``port`` answers /ready with 200; fail at once if ``proc`` exits."""

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return http_get(f"http://127.0.0.1:{port}/ready")[0] == 200
        except OSError:
            return False

    wait_until(ready, timeout, "gateway ready", interval=0.2)


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    worker_id: str | None = None
    port: int | None = None
    probe_port: int | None = None  # a gateway's /health, /ready, /metrics listener

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Stack:
    tmp: Path
    redis_server: RedisServer
    ns: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:8])
    procs: list[Proc] = field(default_factory=list)
    gateway_port: int | None = None

    @property
    def keys(self) -> Keys:
        return Keys(self.ns)

    @property
    def r(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_server.url)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def _env(self, overrides: dict[str, Any]) -> dict[str, str]:
        env = {"MGPU_REDIS_URL": self.redis_server.url, "MGPU_NAMESPACE": self.ns, "MGPU_LOG_LEVEL": "INFO",
               "MGPU_DATA_DIR": str(self.tmp / "data"), "PYTHONPATH": str(ROOT)}
        env.update({("MGPU_" + k.upper()) if not k.isupper() else k: str(v) for k, v in overrides.items()})
        return env

    def start_worker(self, wait: bool = True, timeout: float = 30.0, **overrides: Any) -> Proc:
        overrides.setdefault("engine", "sim")
        overrides.setdefault("model", "sim-model")
        wid = overrides.setdefault("worker_id", f"w{len(self.procs)}-{uuid.uuid4().hex[:4]}")
        log = self.tmp / f"{wid}.log"
        p = Proc(wid, spawn(mgpu_cmd("worker"), env=self._env(overrides), log_path=log, cwd=str(ROOT)), log,
                 worker_id=wid)
        self.procs.append(p)
        if wait:
            self.wait_worker_state(p, "ready", timeout)
        return p

    def worker_state(self, wid: str) -> str | None:
        v = self.r.hget(self.keys.worker(wid), "state")
        return v.decode() if v else None

    def wait_worker_state(self, p: Proc, state: str | None, timeout: float = 30.0) -> None:
        assert p.worker_id

        def ok() -> bool:
            if state is not None and p.proc.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.proc.returncode}:\n{p.output()[-3000:]}")
            return self.worker_state(p.worker_id) == state  # type: ignore[arg-type]

        wait_until(ok, timeout, f"{p.name} state={state}")

    def start_gateway(self, wait_ready: bool = True, **overrides: Any) -> Proc:
        port = free_port()
        overrides.setdefault("port", port)
        overrides.setdefault("health_port", free_port())
        log = self.tmp / f"gateway-{port}.log"
        p = Proc(f"gateway-{port}", spawn(mgpu_cmd("gateway"), env=self._env(overrides), log_path=log,
                                          cwd=str(ROOT)), log, port=port, probe_port=int(overrides["health_port"]))
        self.procs.append(p)
        if self.gateway_port is None:
            self.gateway_port = port

        def up() -> bool:
            if p.proc.poll() is not None:
                raise AssertionError(f"gateway exited:\n{p.output()[-3000:]}")
            try:
                code, _ = http_get(f"http://127.0.0.1:{port}/ready" if wait_ready else
                                   f"http://127.0.0.1:{port}/health", timeout=1)
            except OSError:
                return False
            return code == 200

        wait_until(up, 30, "gateway ready")
        return p

    def openai(self, **kw: Any):  # type: ignore[no-untyped-def]
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, **kw)

    def stop_all(self) -> None:
        for p in self.procs:
            terminate(p.proc, timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    srv.stop()


@pytest.fixture
def stack(tmp_path: Path, redis_server: RedisServer) -> Iterator[Stack]:
    s = Stack(tmp_path, redis_server)
    yield s
    s.stop_all()


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One redis-server, two sim workers (fast and slow models) and a gateway, for read-only API tests."""
    tmp = tmp_path_factory.mktemp("stack")
    srv = RedisServer(tmp / "redis").start()
    s = Stack(tmp, srv)
    s.start_worker(model="sim-model", sim_decode_ms=1, sim_decode_ms_per_seq=0, slots=64, max_model_len=256)
    s.start_worker(model="slow-model", sim_decode_ms=50, slots=4, max_model_len=2048)
    s.start_gateway(max_queue_len=1000)
    yield s
    s.stop_all()
    srv.stop()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
