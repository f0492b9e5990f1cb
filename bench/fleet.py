"""The one launcher of local fleets: every benchmark (and the test suite's ``Stack``) starts its
processes here, the same way.

* :class:`Fleet`: a redis-server and mgpu processes on it, in one namespace: workers (sim or vLLM;
  any setting) and gateways, each a child process with its own log file, started and waited for
  (:meth:`Fleet.start_worker`, :meth:`Fleet.start_gateway`) and all stopped by :meth:`Fleet.stop`.
  ``Fleet.launch(tmp)`` starts a redis-server of its own (stopped with the fleet); ``Fleet(tmp,
  redis_server)`` uses a running one (several fleets may share it, each in its own namespace).
* :class:`NginxFleet`: nginx round-robin over N ``mgpu sim-server`` processes, the push router
  that ``python -m bench.compare`` measures mgpu against.

Settings are given as keyword arguments (``slots=8``, ``sim_decode_ms=0``) or ``MGPU_*`` names
and reach the processes as ``MGPU_*`` environment variables (:func:`settings_env`).  The children
run this checkout's code (``PYTHONPATH`` is the directory that holds ``bench`` and ``ops``).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from common.keys import Keys
from common.redis_conn import is_cluster, sync_client
from ops.procs import RedisServer, free_port, mgpu_cmd, spawn, wait_until

ROOT = Path(__file__).resolve().parent.parent


class FleetError(RuntimeError):
    """A process of the fleet exited while it was waited for; the message ends with its log's tail."""


def http_get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    """(status, parsed JSON body) of a GET; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def settings_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """``{"slots": 8, "MGPU_LOG_LEVEL": "INFO"}`` -> ``{"MGPU_SLOTS": "8", "MGPU_LOG_LEVEL": "INFO"}``:
    lower-case names are mgpu settings, upper-case ones environment variables as they are."""
    return {(k if k.isupper() else "MGPU_" + k.upper()): shlex.join(v) if isinstance(v, list) else str(v)
            for k, v in settings.items()}


def terminate_all(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM to every process at once (workers drain in parallel), then wait for each; SIGKILL
    what is still alive ``timeout`` seconds after the signal."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclass
class Proc:
    """A started mgpu process: its name, the child, its log file; a worker's id, a gateway's port."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    worker_id: str | None = None
    port: int | None = None
    probe_port: int | None = None  # a gateway's /health, /ready, /metrics listener

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def check_alive(self) -> None:
        """FleetError (with the log's tail) when the process has exited."""
        if not self.alive:
            raise FleetError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")


def wait_http_ok(p: Proc, url: str, timeout: float) -> None:
    """Until ``url`` answers 200; FleetError at once if ``p`` exits first."""

    def up() -> bool:
        p.check_alive()
        try:
            return http_get(url, timeout=1)[0] == 200
        except OSError:
            return False

    wait_until(up, timeout, f"{p.name}: {url}", interval=0.1)


@dataclass
class Fleet:
    """A redis-server, and mgpu workers and gateways on it in namespace ``ns`` (see the module doc).

    ``settings`` apply to every process started, before each start's own keyword settings; by default
    every process logs at WARNING and keeps its data under ``tmp/data``.  ``die_with_parent``: each
    child gets SIGTERM when the thread that started it dies (so a killed benchmark leaves no orphan);
    only for fleets started and stopped from one long-lived thread.
    """

    tmp: Path
    redis_server: RedisServer
    ns: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:8])
    settings: dict[str, Any] = field(default_factory=dict)
    die_with_parent: bool = False
    procs: list[Proc] = field(default_factory=list)
    gateway_port: int | None = None  # the first gateway's
    owns_redis: bool = False  # stop() stops the redis-server too
    code: Path = ROOT  # the checkout whose mgpu the processes run (another commit's, to compare)
    redis_url: str | None = None  # the processes' Redis (e.g. a redis+cluster:// URL); None: redis_server's

    @classmethod
    def launch(cls, tmp: Path, *, appendonly: bool = True, **kw: Any) -> Fleet:
        """A fleet with a redis-server of its own (under ``tmp/redis``; AOF on unless ``appendonly``
        is False), which :meth:`stop` stops; ``kw`` as for the constructor."""
        srv = RedisServer(tmp / "redis", appendonly=appendonly, die_with_parent=kw.get("die_with_parent", False))
        return cls(tmp, srv.start(), owns_redis=True, **kw)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- where things are
    @property
    def keys(self) -> Keys:
        return Keys(self.ns, cluster=is_cluster(self.redis_url or ""))

    @property
    def r(self) -> redis.Redis:
        """A new client of the fleet's redis-server (no timeouts: blocking commands work)."""
        return self.redis_client()

    def redis_client(self, **kw: Any) -> redis.Redis:
        if self.redis_url:
            return sync_client(self.redis_url, **kw)
        return redis.Redis.from_url(self.redis_server.url, **kw)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def workers(self) -> list[Proc]:
        """The workers started so far, alive or not, in start order."""
        return [p for p in self.procs if p.worker_id is not None]

    # -- starting
    def env(self, overrides: Mapping[str, Any]) -> dict[str, str]:
        """The environment of a process started with ``overrides``."""
        env = {"MGPU_REDIS_URL": self.redis_url or self.redis_server.url, "MGPU_NAMESPACE": self.ns,
               "MGPU_LOG_LEVEL": "WARNING",
               "MGPU_DATA_DIR": str(self.tmp / "data"), "PYTHONPATH": str(self.code),
               "MGPU_AUTH": "off"}  # on loopback; a fleet with API keys sets auth="keys"
        env.update(settings_env(self.settings))
        env.update(settings_env(overrides))
        return env

    def _spawn(self, cmd: str, name: str, settings: Mapping[str, Any], **proc_kw: Any) -> Proc:
        log = self.tmp / f"{name}.log"
        child = spawn(mgpu_cmd(cmd), env=self.env(settings), log_path=log, cwd=str(self.code),
                      die_with_parent=self.die_with_parent)
        p = Proc(name, child, log, **proc_kw)
        self.procs.append(p)
        return p

    def start_worker(self, wait: bool = True, timeout: float = 30.0, **settings: Any) -> Proc:
        """An ``mgpu worker`` (default: sim engine, model ``sim-model``, a fresh worker id); with
        ``wait``, until the registry lists it as ready."""
        settings.setdefault("engine", "sim")
        settings.setdefault("model", "sim-model")
        wid = str(settings.setdefault("worker_id", f"w{len(self.procs)}-{uuid.uuid4().hex[:4]}"))
        p = self._spawn("worker", wid, settings, worker_id=wid)
        if wait:
            self.wait_worker_state(p, "ready", timeout)
        return p

    def start_gateway(self, wait_ready: bool = True, timeout: float = 30.0, **settings: Any) -> Proc:
        """An ``mgpu gateway`` on a free port (or ``port=``); until it answers /ready with 200
        (/health when not ``wait_ready``: it may have no worker yet)."""
        port = int(settings.setdefault("port", free_port()))
        probe = int(settings.setdefault("health_port", free_port()))
        p = self._spawn("gateway", f"gateway-{port}", settings, port=port, probe_port=probe)
        if self.gateway_port is None:
            self.gateway_port = port
        wait_http_ok(p, f"http://127.0.0.1:{port}/" + ("ready" if wait_ready else "health"), timeout)
        return p

    # -- waiting
    def worker_state(self, wid: str) -> str | None:
        v = self.r.hget(self.keys.worker(wid), "state")
        return v.decode() if v else None

    def wait_worker_state(self, p: Proc, state: str | None, timeout: float = 30.0) -> None:
        """Until the registry shows worker ``p`` in ``state`` (None: gone); FleetError if it exits
        while a live state is awaited."""
        assert p.worker_id is not None, f"{p.name} is not a worker"
        wid = p.worker_id

        def ok() -> bool:
            if state is not None:
                p.check_alive()
            return self.worker_state(wid) == state

        wait_until(ok, timeout, f"{p.name} state={state}")

    def gateway_workers(self) -> dict[str, Any]:
        """The first gateway's /workers: its view of the registry (``workers``, ``strategy``)."""
        code, body = http_get(self.base_url + "/workers", timeout=5)
        if code != 200:
            raise ConnectionError(f"GET {self.base_url}/workers: HTTP {code}")
        return dict(body)

    def wait_routable(self, timeout: float = 60.0) -> None:
        """Until the gateway lists every live worker of the fleet as ready (it routes to them)."""
        want = {p.worker_id for p in self.workers() if p.alive}

        def ready() -> bool:
            try:
                ws = self.gateway_workers()["workers"]
            except OSError:
                return False
            return want <= {w.get("id") for w in ws if w.get("state") == "ready"}

        wait_until(ready, timeout, f"{len(want)} workers ready", interval=0.2)

    def set_strategy(self, name: str, timeout: float = 10.0) -> None:
        """Switch the gateways' strategy through the control hash, until the first gateway uses it."""
        self.r.hset(self.keys.control, "strategy", name)
        wait_until(lambda: self.gateway_workers()["strategy"] == name, timeout, f"strategy {name}")

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until no worker has a request in flight or queued (as the gateway sees them)."""

        def idle() -> bool:
            ws = self.gateway_workers()["workers"]
            return all(int(w["in_flight"]) == 0 and int(w.get("queued", 0)) == 0 for w in ws)

        wait_until(idle, timeout, "fleet idle", interval=0.2)

    # -- stopping
    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process (SIGTERM: workers drain; SIGKILL after ``timeout``), then the
        redis-server if the fleet started it.  Safe to call twice."""
        terminate_all([p.proc for p in self.procs], timeout)
        self.procs.clear()
        if self.owns_redis:
            self.redis_server.stop()


@dataclass
class NginxFleet:
    """nginx (generated config, ``upstream`` round-robin) over ``n`` ``mgpu sim-server`` processes
    with the sim settings ``sim`` (as for :meth:`Fleet.start_worker`)."""

    tmp: Path
    n: int
    sim: dict[str, Any]
    model: str = "sim"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    port: int = 0
    config: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> NginxFleet:
        ports = [free_port() for _ in range(self.n)]
        for i, port in enumerate(ports):
            env = {"PYTHONPATH": str(ROOT), "MGPU_LOG_LEVEL": "WARNING",
                   **settings_env({**self.sim, "port": port, "model": self.model})}
            p = Proc(f"sim-server :{port}", spawn(mgpu_cmd("sim-server"), env=env, log_path=self.tmp / f"sim{i}.log",
                                                  die_with_parent=True), self.tmp / f"sim{i}.log", port=port)
            self.procs.append(p.proc)
            wait_http_ok(p, f"http://127.0.0.1:{port}/health", 30)
        self.port = free_port()
        prefix = self.tmp / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        self.config = nginx_config(prefix, self.port, ports)
        conf = prefix / "nginx.conf"
        conf.write_text(self.config)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        p = Proc("nginx", spawn([nginx, "-p", str(prefix), "-c", str(conf)], log_path=self.tmp / "nginx.out",
                                die_with_parent=True), self.tmp / "nginx.out")
        self.procs.append(p.proc)
        wait_http_ok(p, self.base_url + "/health", 20)
        return self

    def wait_idle(self) -> None:
        """Nothing to wait for: each run drains its own requests (run_load waits for them)."""

    def stop(self) -> None:
        terminate_all(list(reversed(self.procs)))
        self.procs.clear()


def nginx_config(prefix: Path, port: int, upstreams: list[int]) -> str:
    """An nginx.conf: one worker process, round-robin over ``upstreams`` with keep-alive, no buffering."""
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in upstreams)
    return f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    upstream sim {{
        # round-robin (nginx's default)
{servers}
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""
