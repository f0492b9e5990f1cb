"""Redis high availability with real processes: one primary, one replica, three Sentinels (redis-server
--sentinel), a gateway and two sim workers that know Redis only by a ``redis+sentinel://`` URL.  The primary
is killed (SIGKILL) while requests run; the fleet must find the new primary without a restart, and every
accepted request must end in an answer or an explicit error.  With ``enqueue_wait_replicas=1`` none may be
lost.  The figures (time to resume; answered, failed explicitly, lost) are printed and written to
``$MGPU_HA_REPORT`` when it is set (docs/deployment.md quotes them)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from ops.procs import RedisServer, SentinelServer, sentinel_url, wait_until
from tests.conftest import Stack

pytestmark = [pytest.mark.slow]


@dataclass
class HA:
    primary: RedisServer
    replica: RedisServer
    sentinels: list[SentinelServer]

    @property
    def url(self) -> str:
        return sentinel_url(self.sentinels)

    def named(self) -> set[tuple[str, int] | None]:
        out = set()
        for s in self.sentinels:
            try:
                out.add(s.primary())
            except redis.RedisError:
                out.add(None)
        return out


def _link_up(replica: RedisServer, primary_port: int | None = None) -> bool:
    with redis.Redis(port=replica.port, socket_timeout=1) as c:
        info = c.info("replication")
    return (info.get("role") == "slave" and info.get("master_link_status") == "up"
            and primary_port in (None, info.get("master_port")))


def _whole_again(ha: HA) -> bool:
    """The sentinels agree on a primary and the other server replicates it.  Most often the restarted old
    primary is made a replica; but Sentinel may also fail over a second time (a sentinel that misses the new
    primary's replies for down-after-milliseconds just after the switch, with the other sentinels' down votes
    of the first failover still standing, reaches ODOWN at once) and promote the restarted one again: the
    fleet must follow either way."""
    named = ha.named()
    if len(named) != 1 or None in named:
        return False
    (_host, port), = named  # type: ignore[misc]
    other = ha.replica if port == ha.primary.port else ha.primary
    return _link_up(other, port)


# Sentinel's events that say why a restarted primary is or is not made a replica: +tilt (a sentinel whose timer
# stalled over 2 s acts on nothing for 30 s), sdown of either instance, +convert-to-slave
_EVENTS = ("tilt", "sdown", "odown", "convert-to-slave", "switch-master", "+slave ")


def _wait_whole(ha: HA, timeout: float) -> None:
    """Until :func:`_whole_again`; a timeout's message says what the sentinels and servers saw."""
    try:
        wait_until(lambda: _whole_again(ha), timeout, "one primary and its replica again", interval=0.1)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{_why_not_whole(ha)}") from None


def _why_not_whole(ha: HA) -> str:
    """What the sentinels and the restarted primary say, for a timeout's message."""
    lines = []
    for s in ha.sentinels:
        log = (s.data_dir / "sentinel.log").read_text(errors="replace").splitlines()
        lines += [f"sentinel {s.port}: {ln}" for ln in log if any(e in ln for e in _EVENTS)][-12:]
        try:
            with s.client() as c:
                lines.append(f"sentinel {s.port}: tilt={c.info('sentinel').get('sentinel_tilt')}")
        except redis.RedisError as exc:
            lines.append(f"sentinel {s.port}: {exc!r}")
    for name, server in (("old primary", ha.primary), ("old replica", ha.replica)):
        try:
            with redis.Redis(port=server.port, socket_timeout=1, decode_responses=True) as c:
                info = c.info("replication")
            lines.append(f"{name}: {info}")
        except redis.RedisError as exc:
            lines.append(f"{name}: {exc!r}")
    log = (ha.primary.data_dir / "redis.log").read_text(errors="replace").splitlines()
    lines += [f"old primary log: {ln}" for ln in log[-15:]]
    return "\n".join(lines)


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[HA]:
    # one replica each: no 5 s wait for more replicas before a full sync (repl-diskless-sync-delay)
    fast_sync = ["--repl-diskless-sync-delay", "0"]
    primary = RedisServer(tmp_path / "primary", extra_args=fast_sync).start()
    replica = RedisServer(tmp_path / "replica",
                          extra_args=[*fast_sync, "--replicaof", "127.0.0.1", str(primary.port)]).start()
    wait_until(lambda: _link_up(replica), 20, "the replica's link to the primary")
    sentinels = [SentinelServer(tmp_path / f"sentinel{i}", primary.port).start() for i in range(3)]

    def known() -> bool:  # every sentinel sees the replica and the two other sentinels
        for s in sentinels:
            with s.client() as c:
                info = c.sentinel_master(s.service)
                if int(info["num-slaves"]) < 1 or int(info["num-other-sentinels"]) < 2:
                    return False
        return True

    wait_until(known, 30, "the sentinels to know the replica and each other", interval=0.2)
    h = HA(primary, replica, sentinels)
    yield h
    for s in sentinels:
        s.stop()
    replica.stop()
    primary.stop()


@dataclass
class Outcome:
    sent_at: float
    done_at: float
    status: int  # 0: no HTTP answer at all
    code: str


class Load:
    """``clients`` threads each posting chat requests in a loop until the block ends; every outcome kept."""

    def __init__(self, base: str, clients: int) -> None:
        self.base = base
        self.out: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(90)

    @property
    def hung(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def answered(self, after: float = 0.0) -> int:
        return sum(o.status == 200 and o.sent_at > after for o in list(self.out))

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as c:
            i = 0
            while not self._stop.is_set():
                i += 1
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/chat/completions", json={
                        "model": "sim-model", "max_tokens": 8,
                        "messages": [{"role": "user", "content": f"request {threading.get_ident()} {i}"}]})
                    try:
                        code = "" if r.status_code == 200 else str(r.json().get("error", {}).get("code"))
                    except ValueError:  # not JSON (a 500 from a framework would be): counted by its status
                        code = "not json"
                    o = Outcome(t0, time.monotonic(), r.status_code, code)
                except httpx.HTTPError as exc:
                    o = Outcome(t0, time.monotonic(), 0, type(exc).__name__)
                with self._lock:
                    self.out.append(o)


def _report(report: Mapping[str, object]) -> None:
    print(json.dumps(report))
    if os.environ.get("MGPU_HA_REPORT"):
        with open(os.environ["MGPU_HA_REPORT"], "a") as f:
            f.write(json.dumps(report) + "\n")


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["no-wait", "wait-1"])
def test_sentinel_failover_under_load(ha: HA, tmp_path: Path, wait_replicas: int) -> None:
    stack = Stack(tmp_path, ha.primary)
    stack.settings.update(redis_url=ha.url)
    for _ in range(2):
        stack.start_worker(slots=16)
    stack.start_gateway(enqueue_wait_replicas=wait_replicas, enqueue_wait_timeout_ms=500, request_timeout_s=30)
    try:
        with Load(stack.base_url, 6) as load:
            wait_until(lambda: load.answered() >= 50, 30, "50 answers before the kill")
            old = ("127.0.0.1", ha.primary.port)
            killed_at = time.monotonic()
            ha.primary.kill()
            wait_until(lambda: ha.named() == {("127.0.0.1", ha.replica.port)}, 60,
                       "the sentinels to promote the replica", interval=0.1)
            promoted_at = time.monotonic()
            # the old primary comes back (as a restarted pod would) and Sentinel makes it the new replica (it
            # demotes it after 8 s of it reporting itself primary, seen by INFO every 10 s; then a sync)
            ha.primary.start()
            _wait_whole(ha, 90)
            back_at = time.monotonic()
            wait_until(lambda: load.answered(after=back_at) >= 50, 60, "50 answers after the failover")
    finally:
        stack.stop_all()
    assert not load.hung, "a client hung"
    out = load.out
    after = [o for o in out if o.sent_at > killed_at]
    resumed = min((o.done_at for o in after if o.status == 200), default=float("inf"))
    counts = Counter("answered" if o.status == 200 else
                     "lost" if o.status in (0, 504) else  # accepted, then never answered (or no HTTP answer)
                     "refused" if o.status == 503 else "failed" for o in out)
    report = {"wait_replicas": wait_replicas, "requests": len(out), **counts,
              "promoted_after_s": round(promoted_at - killed_at, 2),
              "first_answer_after_kill_s": round(resumed - killed_at, 2),
              "replicated_again_after_s": round(back_at - killed_at, 2),
              "primary_at_the_end": sorted(ha.named(), key=str),
              "refusal_codes": dict(Counter(o.code for o in out if o.status == 503)),
              "old_primary": list(old)}
    _report(report)
    assert counts["answered"] >= 100
    assert counts["failed"] == 0, [o for o in out if o.status not in (0, 200, 503, 504)]
    assert resumed < float("inf")
    if wait_replicas:
        assert counts["lost"] == 0


def test_a_sentinel_that_names_no_primary_gives_503_with_retry_after(tmp_path: Path) -> None:
    """The gateway starts and answers, but every request gets a 503 with Retry-After that names the cause,
    at once (no hang), while the sentinels know no primary of that name."""
    primary = RedisServer(tmp_path / "primary").start()
    sentinel = SentinelServer(tmp_path / "sentinel", primary.port, quorum=1).start()
    try:
        stack = Stack(tmp_path, primary)
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/no-such-primary/0"
        stack.start_gateway(wait_ready=False, redis_url=url)
        t0 = time.monotonic()
        r = httpx.post(stack.base_url + "/v1/chat/completions", timeout=30, json={
            "model": "sim-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers.get("retry-after") == "1"
        assert "unreachable" in r.json()["error"]["message"] and time.monotonic() - t0 < 10
        stack.stop_all()
    finally:
        sentinel.stop()
        primary.stop()


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["no-wait", "wait-1"])
def test_a_manual_failover_demotes_the_primary_under_load(ha: HA, tmp_path: Path, wait_replicas: int) -> None:
    """SENTINEL FAILOVER: the replica is promoted, then the old primary becomes a read-only replica while the
    fleet's connections still point at it.  Their next write fails (READONLY, turned into a connection error
    by the Sentinel pool) and the next connection finds the new primary; no process restarts.  Between the
    promotion and the demotion the old primary still takes writes that the resync then drops: without WAIT
    such a request is lost (a 504 at its deadline, counted and reported); with ``enqueue_wait_replicas=1`` the
    old primary has no replica left in that window, so such a request is refused (503) instead: none lost."""
    stack = Stack(tmp_path, ha.primary)
    stack.settings.update(redis_url=ha.url)
    stack.start_worker(slots=16)
    gw = stack.start_gateway(request_timeout_s=20, enqueue_wait_replicas=wait_replicas, enqueue_wait_timeout_ms=500)
    try:
        with Load(stack.base_url, 4) as load:
            wait_until(lambda: load.answered() >= 30, 30, "30 answers before the failover")
            switched_at = time.monotonic()
            with ha.sentinels[0].client() as c:
                assert c.execute_command("SENTINEL", "FAILOVER", "mymaster")
            wait_until(lambda: ha.named() == {("127.0.0.1", ha.replica.port)}, 60, "the switch", interval=0.1)
            _wait_whole(ha, 60)  # the old primary a replica (or, after a second failover, the primary)
            wait_until(lambda: load.answered(after=switched_at) >= 30, 60, "30 answers after the failover")
            never_restarted = all(p.alive for p in stack.procs) and gw.alive
    finally:
        stack.stop_all()
    assert not load.hung, "a client hung"
    out = load.out
    counts = Counter(o.status for o in out)
    report = {"manual_failover": True, "wait_replicas": wait_replicas, "requests": len(out),
              **{str(k): v for k, v in counts.items()}}
    _report(report)
    assert set(counts) <= {200, 503, 504}, counts  # answered, refused, or lost to the resync: never a 500
    if wait_replicas:
        assert set(counts) <= {200, 503}, counts  # none lost
    assert never_restarted


def test_a_wrong_sentinel_password_stops_start_up_naming_it(tmp_path: Path) -> None:
    from common.redis_conn import check_credentials
    from common.settings import SettingsError

    primary = RedisServer(tmp_path / "primary").start()
    sentinel = SentinelServer(tmp_path / "sentinel", primary.port, quorum=1, password="sentinel-pw").start()
    try:
        base = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"
        check_credentials(base + "?sentinel_password=sentinel-pw")  # right: no error
        with pytest.raises(SettingsError, match="refused the sentinel_password") as exc:
            check_credentials(base + "?sentinel_password=not-the-pw-xyz")
        assert "not-the-pw-xyz" not in str(exc.value)
    finally:
        sentinel.stop()
        primary.stop()
