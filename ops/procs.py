"""Local processes: a redis-server of our own, and mgpu parts as child processes.

Used by ``mgpu up``, the test suite and the benchmarks, so that all of them start things the
same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be listened on now (a hint: another process may take it next)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_until(pred, timeout: float, what: str, interval: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class RedisServer:
    """A redis-server child with AOF persistence (``appendfsync everysec``, ``noeviction``)."""

    data_dir: Path
    port: int = 0
    binary: str = field(default_factory=lambda: shutil.which("redis-server") or "/usr/bin/redis-server")
    proc: subprocess.Popen[bytes] | None = None
    appendonly: bool = True
    maxmemory: str = "0"  # e.g. "2gb"; "0": no limit (the gateway refuses work near a set limit)
    # SIGTERM (a clean, AOF-flushing shutdown) when the process that started it dies, even by SIGKILL:
    # a second redis-server must never append to the same AOF.  Only for a server started from a thread
    # that lives as long as it should (the signal follows the starting thread).
    die_with_parent: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if not self.port:
            self.port = free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction", "--daemonize", "no",
                "--protected-mode", "yes", "--logfile", str(self.data_dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent if self.die_with_parent and sys.platform == "linux"
                                     else None)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=1)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.data_dir}/redis.log")
            try:
                return bool(client.ping()) and client.info("persistence").get("loading") == 0
            except redis.RedisError:
                return False

        wait_until(up, timeout, f"redis-server on port {self.port}")
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: the hard crash the AOF must survive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()


def mgpu_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ops.cli", *args]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def spawn(args: list[str], *, env: dict[str, str] | None = None, log_path: Path | None = None,
          cwd: str | None = None, die_with_parent: bool = False) -> subprocess.Popen[bytes]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(args, env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True,
                                preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None)
    finally:
        if log_path is not None:
            out.close()  # type: ignore[union-attr]


def terminate(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)
