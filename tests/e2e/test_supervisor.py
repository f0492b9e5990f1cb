"""``mgpu up``: restarts with backoff, leaves a crash-looping worker down and says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from common.keys import Keys
from ops.fleet import CRASH_LOOP_N, Child
from ops.procs import free_port, wait_until
from tests.conftest import ROOT, wait_ready


def test_backoff_then_crash_loop() -> None:
    c = Child("w", [], {}, Path("/dev/null"))
    delays = [c.on_exit(t) for t in (0.0, 1.0, 2.0, 3.0)]
    assert delays == [0.5, 1.0, 2.0, 4.0] and not c.down
    assert c.on_exit(4.0) is None and c.down  # the 5th exit within a minute
    fresh = Child("w", [], {}, Path("/dev/null"))
    assert [fresh.on_exit(t) for t in (0.0, 61.0, 122.0)] == [0.5, 0.5, 0.5]  # spread out: no loop


def test_up_restarts_a_killed_worker_and_reports_a_crash_loop(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MGPU_")}
    env.update(PYTHONPATH=str(ROOT), MGPU_SIM_DECODE_MS="1")
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "up", "--engine", "sim", "--model", "sim-up",
                             "--workers", "1", "--port", str(port), "--data-dir", str(tmp_path / "data")],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, port, tmp_path / "up.log", 60)
        workers = httpx.get(f"http://127.0.0.1:{port}/workers").json()["workers"]
        assert len(workers) == 1
        wid = workers[0]["id"]
        redis_url = (tmp_path / "data" / "redis-url").read_text().strip()
        r = redis.Redis.from_url(redis_url)
        key = Keys().worker(wid)

        def pid_ready() -> int | None:
            h = r.hgetall(key)
            return int(h[b"pid"]) if h.get(b"state") == b"ready" else None

        for _ in range(CRASH_LOOP_N):
            pid = pid_ready()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda p=pid: pid_ready() not in (None, p) or r.hget(key, "state") == b"crashloop",
                       30, "restarted or reported down", interval=0.05)
        assert r.hget(key, "state") == b"crashloop"

        def shown_state() -> str | None:
            shown = {w["id"]: w for w in httpx.get(f"http://127.0.0.1:{port}/workers").json()["workers"]}
            return shown[wid]["state"] if wid in shown else None

        wait_until(lambda: shown_state() == "crashloop", 5, "/workers shows the crash loop")
        assert "crash-loops" in (tmp_path / "up.log").read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 503  # no live worker left
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
        log.close()
    assert rc == 0


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: nothing reaps orphans promptly here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _up(tmp_path: Path, port: int, log_name: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MGPU_")}
    env.update(PYTHONPATH=str(ROOT), MGPU_SIM_DECODE_MS="1")
    with open(tmp_path / log_name, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "ops.cli", "up", "--engine", "sim", "--model", "sim-up",
                                 "--workers", "1", "--port", str(port), "--data-dir", str(tmp_path / "data")],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _up_redis(proc: subprocess.Popen[bytes], port: int, log: Path) -> redis.Redis:
    """Once that `mgpu up` is ready: a client of the redis-server it started (its URL, with the password
    it generated, is in <data dir>/redis-url)."""
    wait_ready(proc, port, log, 60)
    return redis.Redis.from_url((log.parent / "data" / "redis-url").read_text().strip())


def test_up_locks_its_redis_and_files_to_its_owner(tmp_path: Path) -> None:
    """mgpu up's redis-server: loopback, a generated password (never in its log), data and logs the
    owner's only; a control command run where mgpu up runs finds it through <data dir>/redis-url."""
    port = free_port()
    proc = _up(tmp_path, port, "up.log")
    try:
        r = _up_redis(proc, port, tmp_path / "up.log")
        url_file = tmp_path / "data" / "redis-url"
        password = redis.connection.parse_url(url_file.read_text().strip())["password"]
        assert len(password) >= 24 and password not in (tmp_path / "up.log").read_text()
        assert password not in Path(f"/proc/{r.info('server')['process_id']}/cmdline").read_text()  # not in ps
        port_r = r.connection_pool.connection_kwargs["port"]
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port_r).ping()  # no password: refused
        assert r.config_get("bind")["bind"].split() == ["127.0.0.1"]
        for path in (url_file, tmp_path / "data" / "redis", tmp_path / "data" / "logs",
                     *(tmp_path / "data" / "logs").glob("*.log")):
            assert path.stat().st_mode & 0o077 == 0, path
        env = {k: v for k, v in os.environ.items() if not k.startswith("MGPU_")}
        out = subprocess.run([sys.executable, "-m", "ops.cli", "status", "--once", "--interval", "0.1"],
                             env={**env, "PYTHONPATH": str(ROOT), "MGPU_DATA_DIR": str(tmp_path / "data")},
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert out.returncode == 0 and "sim-up" in out.stdout, out.stderr
        r.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


def test_a_killed_up_takes_its_redis_and_children_with_it_and_keeps_the_data(tmp_path: Path) -> None:
    """SIGKILL of `mgpu up` (nothing of it runs its shutdown): its redis-server, gateway and worker all
    exit, redis-server flushing its AOF, so a second `mgpu up` on the same data folder never runs next
    to an orphan writing the same file, and finds what was written."""
    port = free_port()
    proc = _up(tmp_path, port, "up1.log")
    try:
        r = _up_redis(proc, port, tmp_path / "up1.log")
        redis_pid = int(r.info("server")["process_id"])
        r.set("kept-across-the-kill", "yes")
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert redis_pid in children and len(children) >= 3  # redis-server, gateway, worker
        r.close()
    finally:
        proc.kill()
        proc.wait(10)
    try:
        for pid in children:
            wait_until(lambda p=pid: _gone(p), 30, f"child {pid} of the killed mgpu up exits", interval=0.05)
    finally:  # when it failed: leave no orphan behind
        for pid in children:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)

    port2 = free_port()
    proc2 = _up(tmp_path, port2, "up2.log")
    try:
        r2 = _up_redis(proc2, port2, tmp_path / "up2.log")
        assert r2.get("kept-across-the-kill") == b"yes"
        r2.close()
    finally:
        proc2.send_signal(signal.SIGINT)
        rc = proc2.wait(60)
    assert rc == 0
