"""Local processes: a redis-server of our own, and mgpu parts as child processes.

Used by ``mgpu up``, the test suite and the benchmarks, so that all of them start things the
same way.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel gives to outgoing connections (``ip_local_port_range``)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: set[int] = set()


def free_port(gap: int = 1) -> int:
    """A port free now with ``port + gap`` free too (a gateway's probe listener takes port + 1 by default; a
    cluster node's bus, port + 10000), both below the kernel's ephemeral range: a port from that range (what
    binding port 0 gives) can be taken as the local end of any outgoing connection before our server binds
    it, which CI saw once ("address already in use" at a gateway's start).  Not one handed out before by this
    process."""
    low, high = _ephemeral_range()
    first, last = (10000, low - 1 - gap) if low - gap > 12000 else (high + 1, 65535 - gap)
    rng = random.Random()
    for _ in range(500):
        port = rng.randint(first, last)
        pair = (port, port + gap)
        if not _handed_out.intersection(pair) and port_free(port) and port_free(port + gap):
            _handed_out.update(pair)
            return port
    raise RuntimeError(f"no free port pair ({gap} apart) in {first}-{last + gap}")


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
    password: str | None = None  # the default user's (requirepass, or in ``acl``); part of ``url``
    acl: list[str] = field(default_factory=list)  # ACL file lines (``user NAME on >pw ~keys +cmds``)
    extra_args: list[str] = field(default_factory=list)  # more redis-server arguments (they win over these)
    tls_port: int = 0  # with extra_args that open a TLS port: ``url`` is rediss:// there, verified with tls_ca
    tls_ca: str | None = None
    # SIGTERM (a clean, AOF-flushing shutdown) when the process that started it dies, even by SIGKILL:
    # a second redis-server must never append to the same AOF.  Only for a server started from a thread
    # that lives as long as it should (the signal follows the starting thread).
    die_with_parent: bool = False
    host: str = "127.0.0.1"  # the address it binds and ``url`` names
    prefix: list[str] = field(default_factory=list)  # runs it under this command (e.g. ``ip netns exec NS``)

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls_port:
            return f"rediss://{auth}{self.host}:{self.tls_port}/0?ssl_ca_certs={quote(self.tls_ca or '', safe='/')}"
        return f"redis://{auth}{self.host}:{self.port}/0"

    def url_for(self, user: str, password: str) -> str:
        return f"redis://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if not self.port:
            self.port = free_port()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # the AOF holds prompts and answers
        conf = self.data_dir / "redis.conf"  # secrets go in files of the owner's, never in argv (ps shows it)
        with private_log(conf) as f:
            f.truncate(0)
            if self.password and not self.acl:  # with an ACL file, the default user's password is in it
                f.write(f"requirepass {self.password}\n".encode())
        args = [*self.prefix, self.binary, str(conf), "--port", str(self.port), "--bind", self.host,
                "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction", "--daemonize", "no",
                "--protected-mode", "yes", "--logfile", str(self.data_dir / "redis.log")]
        if self.acl:
            aclfile = self.data_dir / "users.acl"
            with private_log(aclfile) as f:
                f.truncate(0)
                f.write(("\n".join(self.acl) + "\n").encode())
            args += ["--aclfile", str(aclfile)]
        args += self.extra_args
        die = _die_with_parent if self.die_with_parent and sys.platform == "linux" else None

        def preexec() -> None:
            _private_files()
            if die is not None:
                die()

        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=preexec)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=1)

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
        if self.proc is not None:
            terminate(self.proc, 10)

    def restart(self) -> None:
        self.kill()
        self.start()


@dataclass
class ClusterServers:
    """A real Redis Cluster of ``primaries`` redis-servers (``--cluster-enabled yes``, AOF on), its slots
    assigned by ``redis-cli --cluster create`` (evenly, in port order, no replicas)."""

    data_dir: Path
    primaries: int = 3
    nodes: list[RedisServer] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> ClusterServers:
        for i in range(self.primaries):
            d = self.data_dir / f"node{i}"
            self.nodes.append(RedisServer(d, port=free_port(gap=10000), extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", "2000"]).start())
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        out = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                              "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")

        def ok() -> bool:
            for n in self.nodes:
                with redis.Redis(port=n.port, socket_timeout=1) as c:
                    info = c.cluster("info")
                    if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != self.primaries:
                        return False
            return True

        wait_until(ok, timeout, "the cluster's state to be ok on every node", interval=0.1)
        return self

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def node_of(self, key: str) -> RedisServer:
        """The primary that serves ``key``'s slot now."""
        with redis.Redis(port=self.nodes[0].port, socket_timeout=2) as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def move_slot(self, key: str, to: RedisServer, batch: int = 100) -> int:
        """Move ``key``'s slot to node ``to`` with its keys, as ``redis-cli --cluster reshard`` moves slots
        (IMPORTING/MIGRATING, MIGRATE in batches, SETSLOT NODE on every node); returns the keys moved."""
        src = self.node_of(key)
        with redis.Redis(port=src.port, socket_timeout=10) as s, redis.Redis(port=to.port, socket_timeout=10) as d:
            slot = int(s.execute_command("CLUSTER", "KEYSLOT", key))
            src_id, dst_id = s.execute_command("CLUSTER", "MYID"), d.execute_command("CLUSTER", "MYID")
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while names := s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                s.execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *names)
                moved += len(names)
            for n in [to, src, *(n for n in self.nodes if n is not to and n is not src)]:
                with redis.Redis(port=n.port, socket_timeout=10) as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@dataclass
class SentinelServer:
    """A Redis Sentinel (``redis-server <conf> --sentinel``, the binary Debian's redis-sentinel runs) that
    watches the primary ``service`` at ``primary_port``; quorum 2 of the usual three."""

    data_dir: Path
    primary_port: int
    service: str = "mymaster"
    port: int = 0
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000
    quorum: int = 2
    password: str | None = None  # the sentinel's own (requirepass): clients give it as sentinel_password
    binary: str = field(default_factory=lambda: shutil.which("redis-server") or "/usr/bin/redis-server")
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> SentinelServer:
        if not self.port:
            self.port = free_port()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        conf = self.data_dir / "sentinel.conf"  # Sentinel rewrites it: what it learns of the fleet
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.data_dir}\n"
                        f"logfile {self.data_dir / 'sentinel.log'}\n"
                        f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} {self.quorum}\n"
                        f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                        f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                        f"sentinel parallel-syncs {self.service} 1\n"
                        + (f"requirepass {self.password}\n" if self.password else ""))
        conf.chmod(0o600)
        self.proc = subprocess.Popen([self.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=_private_files)
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2, socket_timeout=1)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis sentinel exited with {self.proc.returncode}; see {self.data_dir}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(up, timeout, f"redis sentinel on port {self.port}")
        client.close()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1, socket_timeout=2,
                           decode_responses=True)

    def primary(self) -> tuple[str, int] | None:
        """The primary this sentinel names now."""
        with contextlib.closing(self.client()) as c:
            addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return (addr[0], int(addr[1])) if addr else None

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, 10)


def sentinel_url(sentinels: list[SentinelServer], db: int = 0) -> str:
    return (f"redis+sentinel://{','.join(f'127.0.0.1:{s.port}' for s in sentinels)}/"
            f"{sentinels[0].service}/{db}")


def mgpu_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ops.cli", *args]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def private_log(path: Path) -> Any:
    """A log file opened for appending, created readable by its owner only (logs name requests and hosts)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


def _private_files() -> None:
    os.umask(0o077)


def spawn(args: list[str], *, env: dict[str, str] | None = None, log_path: Path | None = None,
          cwd: str | None = None, die_with_parent: bool = False) -> subprocess.Popen[bytes]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    out = private_log(log_path) if log_path is not None else subprocess.DEVNULL
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
