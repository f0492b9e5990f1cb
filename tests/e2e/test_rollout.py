"""Rolling updates of ``mgpu up`` workers (``mgpu rollout``): under constant load through the gateway,
every request succeeds with the sim's exact text while workers are replaced, rolled back by hand,
or rolled back automatically from broken settings."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.settings import Settings
from gpu_worker.engine.sim import expected_text
from ops import rollout
from ops.procs import free_port, mgpu_cmd, spawn, terminate, wait_until
from ops.rollout import RolloutError, RolloutOptions, RolloutState, parse_changes
from tests.conftest import ROOT, Stack, wait_ready

MODEL = "sim-roll"
TOKENS = 8


class Load:
    """Clients in background threads: each sends one completion after another until closed and
    checks the answer against the simulator's deterministic text.  No retries (max_retries=0)."""

    def __init__(self, stack: Stack, threads: int = 3) -> None:
        self.stack = stack
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), name=f"load-{t}", daemon=True)
                         for t in range(threads)]
        for th in self._threads:
            th.start()

    def _run(self, t: int) -> None:
        client = self.stack.openai(timeout=60)
        i = 0
        try:
            while not self._stop.is_set():
                prompt = f"client {t} request {i} says hello to the rolling update"  # 10 words
                i += 1
                try:
                    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=TOKENS)
                    good = r.choices[0].text == expected_text(prompt, max_tokens=TOKENS)
                    problem = None if good else f"{prompt!r}: wrong text {r.choices[0].text!r}"
                except Exception as exc:  # any failure is what this test counts
                    problem = f"{prompt!r}: {type(exc).__name__}: {exc}"
                with self._lock:
                    if problem is None:
                        self.ok += 1
                    else:
                        self.failures.append(problem)
        finally:
            client.close()

    def progressed(self, by: int = 10, timeout: float = 30) -> None:
        """Until ``by`` more requests have succeeded."""
        target = self.ok + by
        wait_until(lambda: self.ok >= target, timeout, f"{by} more requests served")

    def close(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(60)

    def __enter__(self) -> Load:
        try:
            self.progressed()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def up(stack: Stack) -> Iterator[Stack]:
    """``mgpu up --engine sim --workers 2`` on the test's redis-server, with its gateway."""
    port = free_port()
    env = {"MGPU_REDIS_URL": stack.redis_server.url, "MGPU_NAMESPACE": stack.ns, "PYTHONPATH": str(ROOT)}
    log = stack.tmp / "up.log"
    proc = spawn(mgpu_cmd("up", "--engine", "sim", "--model", MODEL, "--workers", "2", "--port", str(port),
                          "--data-dir", str(stack.tmp / "data"), "--drain-grace-s", "5", "--sim-decode-ms", "1",
                          "--sim-decode-ms-per-seq", "0", "--sim-prefill-ms-per-token", "0"),
                 env=env, log_path=log, cwd=str(ROOT))
    try:
        wait_ready(proc, port, log, 60)
        stack.gateway_port = port
        wait_until(lambda: len(ready_workers(stack)) == 2, 30, "two ready workers")
        wait_until(lambda: rollout.live_supervisors(stack.r, stack.keys), 10, "the supervisor announced")
        yield stack
    finally:
        terminate(proc, timeout=30)


def ready_workers(stack: Stack) -> dict[str, dict[str, str]]:
    """worker id -> registry hash, for the ready workers."""
    out = {}
    for wid in stack.r.smembers(stack.keys.workers):
        h = {k.decode(): v.decode() for k, v in stack.r.hgetall(stack.keys.worker(wid.decode())).items()}
        if h.get("state") == "ready":
            out[wid.decode()] = h
    return out


def fleet_revision(stack: Stack) -> str:
    """The one revision of the fleet, once both workers are ready on it."""
    def settled() -> bool:
        ready = ready_workers(stack)
        return len(ready) == 2 and len({h["revision"] for h in ready.values()}) == 1

    wait_until(settled, 15, "two ready workers on one revision")
    return next(iter(ready_workers(stack).values()))["revision"]


def mgpu(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mgpu_cmd(*args), cwd=ROOT, timeout=120, capture_output=True, text=True,
                          env={**stack.env({}), "PATH": "/usr/bin:/bin"})


def mgpu_rollout(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return mgpu(stack, "rollout", *args)


def finished(stack: Stack, rollout_id: str, timeout: float = 60) -> RolloutState:
    def done() -> bool:
        st = rollout.read(stack.r, stack.keys)
        return st is not None and st.id == rollout_id and not st.active

    wait_until(done, timeout, f"rollout {rollout_id} finished", interval=0.1)
    st = rollout.read(stack.r, stack.keys)
    assert st is not None
    return st


def started(stack: Stack, out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    st = rollout.read(stack.r, stack.keys)
    assert st is not None and st.id in out.stdout
    return st.id


def env_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)


# ----------------------------------------------------------------------------- pieces


def test_revision_is_derived_from_what_a_rollout_can_change() -> None:
    base = Settings.load({"engine": "sim", "model": "m"}, env={})
    assert base.effective_revision.startswith("r-")
    same_place = base.model_copy(update={"worker_id": "other", "gpu": 3, "redis_url": "redis://h:1/0"})
    assert same_place.effective_revision == base.effective_revision  # where it runs is not what it runs
    assert Settings.load({"engine": "sim", "model": "m", "sim_decode_ms": "5"}, env={}).effective_revision != \
        base.effective_revision
    assert Settings.load({"engine": "sim", "model": "m", "revision": "v2"}, env={}).effective_revision == "v2"


def test_rollout_changes_are_checked() -> None:
    assert parse_changes(["sim_decode_ms=5", "revision=v2"], None) == {"sim_decode_ms": "5", "revision": "v2"}
    assert parse_changes([], "/no/such/model") == {"model_path": "/no/such/model"}
    with pytest.raises(RolloutError, match="served model name"):
        parse_changes(["model=other"], None)
    with pytest.raises(RolloutError, match="not a setting a rollout can change"):
        parse_changes(["redis_url=redis://x:1/0"], None)
    with pytest.raises(RolloutError, match="MGPU_SLOTS"):
        parse_changes(["slots=0"], None)


def test_one_rollout_at_a_time_and_a_dead_supervisors_lock_expires(stack: Stack) -> None:
    r, keys = stack.r, stack.keys
    first = RolloutState(id="ro-1", options=RolloutOptions())
    assert rollout.request(r, keys, first) is None
    held = rollout.request(r, keys, RolloutState(id="ro-2"))
    assert held is not None and held.id == "ro-1"
    first.phase = "running"
    assert not rollout.write(r, keys, RolloutState(id="ro-2", phase="running"))  # not its rollout
    assert not rollout.write(r, keys, first, expect="rolling_back")  # not in that phase
    assert rollout.write(r, keys, first, expect="requested")
    r.pexpire(keys.rollout_lock, 1)  # its supervisor stopped renewing the lock
    wait_until(lambda: not r.exists(keys.rollout_lock), 5, "lock expired")
    assert not rollout.write(r, keys, first)  # a lost lock takes no more progress writes ...
    first.phase = "failed"
    assert rollout.write(r, keys, first, final=True)  # ... but the final word lands
    assert rollout.request(r, keys, RolloutState(id="ro-3")) is None
    assert [h.id for h in rollout.history(r, keys)] == ["ro-1"]


# ----------------------------------------------------------------------------- end to end, under load


def test_rollout_under_load_then_manual_rollback(up: Stack) -> None:
    stack = up
    with Load(stack) as load:
        r0 = fleet_revision(stack)
        assert r0.startswith("r-")
        before = ready_workers(stack)

        # drain-first (the GPU way), waited for by the command itself
        t0 = time.monotonic()
        served0 = load.ok
        out = mgpu_rollout(stack, "--set", "sim_decode_ms=30", "--set", "revision=v2", "--canary", "2",
                           "--soak", "1", "--ready-timeout", "30", "--wait")
        took = time.monotonic() - t0
        assert out.returncode == 0, out.stdout + out.stderr
        assert "DONE" in out.stdout
        st = rollout.read(stack.r, stack.keys)
        assert st is not None and st.phase == "done" and (st.from_revision, st.to_revision) == (r0, "v2")
        assert [p.phase for p in st.slots] == ["updated", "updated"]
        after = ready_workers(stack)
        assert set(after) == set(before)  # same slots, same worker ids
        for wid, h in after.items():
            assert h["revision"] == "v2" and h["pid"] != before[wid]["pid"]
            assert env_of(int(h["pid"]))["MGPU_SIM_DECODE_MS"] == "30.0"
            metrics = httpx.get(f"http://127.0.0.1:{h['metrics_port']}/metrics", timeout=5).text
            assert 'revision="v2"' in metrics
        shown = httpx.get(stack.base_url + "/workers", timeout=5).json()["workers"]
        assert {w["revision"] for w in shown} == {"v2"}
        # the new settings are in force: 20 steps of at least 30 ms
        t = time.monotonic()
        with stack.openai(timeout=30) as client:
            client.completions.create(model=MODEL, prompt="slow now", max_tokens=20)
        assert time.monotonic() - t >= 0.6
        assert load.ok > served0  # requests were served while the workers were replaced
        status = mgpu(stack, "status", "--once", "--no-color", "--interval", "0.2")
        assert status.returncode == 0 and f"ROLLOUT  {st.id} rollout done" in status.stdout
        assert all(ln.split()[-1] == "v2" for ln in status.stdout.splitlines() if ln.startswith(tuple(after)))
        print(f"\n2-worker drain-first rollout under load: {took:.1f}s (command start to done), "
              f"{load.ok - served0} requests served meanwhile, {len(load.failures)} failed")

        # manual rollback, this time with surge (new worker first): new worker ids
        load.progressed()
        rid = started(stack, mgpu_rollout(stack, "--rollback", "--surge", "--canary", "1", "--soak", "1"))
        st = finished(stack, rid)
        assert (st.kind, st.phase, st.from_revision, st.to_revision) == ("rollback", "done", "v2", r0)
        now = ready_workers(stack)
        assert len(now) == 2 and not set(now) & set(before)
        assert {h["revision"] for h in now.values()} == {r0}
        wait_until(lambda: not any(stack.r.exists(stack.keys.worker(w)) for w in before), 10, "old ids gone")
        # nothing left to roll back to
        out = mgpu_rollout(stack, "--rollback")
        assert out.returncode == 2 and "no earlier revision" in out.stderr
        load.progressed()
    assert load.failures == []
    assert load.ok >= 30


def test_broken_rollouts_roll_back_automatically(up: Stack) -> None:
    stack = up
    with Load(stack) as load:
        r0 = fleet_revision(stack)

        # 1. the new worker exits at start (a model folder that does not exist)
        rid = started(stack, mgpu_rollout(stack, "--set", "engine=vllm", "--model", "/no/such/model",
                                          "--ready-timeout", "30", "--soak", "1"))
        st = finished(stack, rid)
        assert st.phase == "rolled_back", st.reason
        assert "exited with code" in st.reason and "/no/such/model does not exist" in st.reason
        assert [p.phase for p in st.slots] == ["restored", "not reached"]
        assert fleet_revision(stack) == r0
        load.progressed()

        # 2. the new worker starts but fails its canary (a context too short for real requests); it
        # never took a client request: it was never admitted
        rid = started(stack, mgpu_rollout(stack, "--set", "max_model_len=16", "--canary", "2",
                                          "--ready-timeout", "30", "--soak", "1"))
        st = finished(stack, rid)
        assert st.phase == "rolled_back" and "canary" in st.reason and "maximum context length" in st.reason
        assert fleet_revision(stack) == r0
        load.progressed()

        # 3. a second rollout is refused while one runs; --abort rolls the running one back
        rid = started(stack, mgpu_rollout(stack, "--set", "sim_decode_ms=2", "--canary", "1", "--soak", "60"))
        wait_until(lambda: (rollout.read(stack.r, stack.keys) or st).slots[0].phase == "soak", 30,
                   "first worker soaking")
        out = mgpu_rollout(stack, "--set", "sim_decode_ms=3")
        assert out.returncode == 2 and f"another rollout is in progress: {rid}" in out.stderr
        assert mgpu_rollout(stack, "--abort").returncode == 0
        st = finished(stack, rid)
        assert st.phase == "rolled_back" and "aborted by" in st.reason
        assert fleet_revision(stack) == r0
        history = rollout.history(stack.r, stack.keys)
        assert [h.phase for h in history[:3]] == ["rolled_back"] * 3
        load.progressed()
    assert load.failures == []
