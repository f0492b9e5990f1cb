"""Fixtures: a real redis-server per test (on a free port, killable) and mgpu processes on it, started
by the one fleet launcher (:class:`bench.fleet.Fleet`) that the benchmarks use too."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.fleet import ROOT, Fleet, Proc, http_get, wait_http_ok
from ops.procs import RedisServer

__all__ = ["ROOT", "Proc", "Stack", "http_get", "wait_ready"]


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    """Until the gateway on ``port`` answers /ready with 200; fail at once if ``proc`` exits."""
    wait_http_ok(Proc("gateway", proc, log, port=port), f"http://127.0.0.1:{port}/ready", timeout)


@dataclass
class Stack(Fleet):
    """A fleet for one test: processes log at INFO (tests read their logs)."""

    settings: dict[str, Any] = field(default_factory=lambda: {"log_level": "INFO"})

    def openai(self, **kw: Any):  # type: ignore[no-untyped-def]
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, **kw)

    def stop_all(self) -> None:
        self.stop()

    def result_raw(self, request_id: str) -> bytes | None:
        """A request's stored result, whatever its model (results are kept per model)."""
        found = self.r.keys(self.keys.result("*", request_id))
        return self.r.get(found[0]) if found else None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    srv.stop()


@pytest.fixture
def stack(tmp_path: Path, redis_server: RedisServer) -> Iterator[Stack]:
    s = Stack(tmp_path, redis_server)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One redis-server, two sim workers (fast and slow models) and a gateway, for read-only API tests."""
    tmp = tmp_path_factory.mktemp("stack")
    s = Stack(tmp, RedisServer(tmp / "redis").start(), owns_redis=True)
    s.start_worker(model="sim-model", sim_decode_ms=1, sim_decode_ms_per_seq=0, slots=64, max_model_len=256)
    s.start_worker(model="slow-model", sim_decode_ms=50, slots=4, max_model_len=2048)
    s.start_gateway(max_queue_len=1000)
    yield s
    s.stop()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
