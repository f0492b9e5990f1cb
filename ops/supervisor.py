"""``mgpu up``: the whole service on one machine, supervised.

It starts a redis-server of its own (AOF on) unless ``MGPU_REDIS_URL`` / ``--redis-url`` names one,
converts the embedded model once, starts one worker per visible GPU (or ``--workers N`` CPU
workers), starts the gateway, restarts crashed workers with exponential backoff, leaves a
crash-looping worker down (5 crashes within 60 s), and shuts everything down on Ctrl+C/SIGTERM.

It also carries out ``mgpu rollout`` (zero-downtime rolling updates of its workers, with health
gate and rollback: :mod:`ops.rolling`): it announces itself at ``Keys.supervisor`` and polls
``Keys.rollout`` from its main loop, which advances a running rollout one step per tick.

For Prometheus it keeps ``<data_dir>/prometheus/workers.json`` (file_sd targets: every worker's
``/metrics``, from the registry) and ``<data_dir>/prometheus/gateway.json`` up to date.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from common.records import WorkerRecord, WorkerState
from common.redis_conn import redacted, sync_client
from common.settings import ROLLOUT_FIELDS, GatewaySettings, SettingsError, UpSettings, WorkerSettings, to_env
from ops import rollout
from ops.fleet import CRASH_LOOP_WINDOW_S, Child
from ops.procs import RedisServer, free_port, mgpu_cmd, port_free, private_log, terminate
from ops.rolling import RollingUpdate, Steps
from ops.rollout import RolloutError, RolloutState
from ops.targets import TargetsWriter, static_targets, write_json_atomic

log = logging.getLogger("mgpu.up")

TICK_S = 0.25
ROLLOUT_POLL_S = 0.5
STATE_WRITE_S = 2.0  # a running rollout's state is written when it changes, and at least this often (lock)


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


def gpus_per_worker(engine_args: Sequence[str]) -> int:
    """How many GPUs one worker's engine asks for: tensor x pipeline x data parallel size, as ``vllm serve``
    reads those flags (``-tp 2``, ``--tensor-parallel-size=2``, ...)."""
    p = argparse.ArgumentParser(add_help=False)
    for short, long in (("-tp", "--tensor-parallel-size"), ("-pp", "--pipeline-parallel-size"),
                        ("-dp", "--data-parallel-size")):
        p.add_argument(short, long, type=int, default=1, dest=long[2:].replace("-", "_"))
    ns, _ = p.parse_known_args(list(engine_args))
    return max(1, ns.tensor_parallel_size) * max(1, ns.pipeline_parallel_size) * max(1, ns.data_parallel_size)


def plan_gpus(gpus: Sequence[int], per_worker: int) -> list[tuple[int, ...]]:
    """The GPUs of each worker: consecutive groups of ``per_worker`` (what is left over stays idle)."""
    if per_worker > len(gpus):
        raise SettingsError(f"each worker's engine asks for {per_worker} GPUs (its -tp x -pp x -dp flags), and "
                            f"this host has {len(gpus)}")
    return [tuple(gpus[i:i + per_worker]) for i in range(0, len(gpus) - per_worker + 1, per_worker)]


@dataclass(frozen=True)
class SlotSpec:
    """Where one worker runs: its GPUs (none: a CPU slot), its log, its base worker id."""

    name: str
    worker_id: str
    gpus: tuple[int, ...]
    log_path: Path


class Supervisor:
    """The processes of ``mgpu up`` and the loop that keeps them running (and rolls them); to its
    rolling updates, an :class:`ops.fleet.Fleet`."""

    def __init__(self, s: UpSettings, data: Path, gpus: list[tuple[int, ...]]) -> None:
        self.s = s
        self.keys = s.keys
        self.template = WorkerSettings.of(s)  # the settings every worker runs (a rollout replaces it)
        self.history: list[WorkerSettings] = []  # templates before each completed rollout (--rollback pops)
        self.id = socket.gethostname()
        self.data = data
        self.registry_refresh_s = s.registry_refresh_s
        node = os.uname().nodename
        logs = data / "logs"
        if gpus:
            names = ["-".join(map(str, g)) for g in gpus]
            self.specs = [SlotSpec(f"worker-gpu{n}", f"{node}-gpu{n}", g, logs / f"worker-gpu{n}.log")
                          for n, g in zip(names, gpus)]
        else:
            self.specs = [SlotSpec(f"worker-cpu{i}", f"{node}-cpu{i}", (), logs / f"worker-cpu{i}.log")
                          for i in range(s.workers)]
        self._surges = [0] * len(self.specs)
        self.workers: list[Child] = []
        self.port = s.port or free_port()
        # the gateway's probe listener: as set, else the port after the API port, else any free port
        probe = s.health_port if s.health_port is not None else \
            self.port + 1 if port_free(self.port + 1, s.host) else free_port()
        self.gateway = Child("gateway", mgpu_cmd("gateway"),
                             {**to_env(GatewaySettings.of(s)), "MGPU_PORT": str(self.port),
                              "MGPU_HEALTH_PORT": str(probe)}, logs / "gateway.log")
        self.registry = sync_client(s.redis_dsn, socket_timeout=2, socket_connect_timeout=2)
        self.rollout: RollingUpdate | None = None
        self._steps: Steps | None = None
        self._unwritten: RolloutState | None = None  # a final rollout state Redis did not take yet
        self._next = {"targets": 0.0, "presence": 0.0, "poll": 0.0, "write": 0.0, "abort": 0.0}

    # ------------------------------------------------------------------ the fleet (ops.fleet.Fleet)
    def slots(self) -> Sequence[Child]:
        return self.workers

    def assign(self, slot: int, child: Child) -> None:
        self.workers[slot] = child

    def worker_env(self, slot: int, template: WorkerSettings, worker_id: str) -> dict[str, str]:
        spec = self.specs[slot]
        extra = {"MGPU_WORKER_ID": worker_id, "MGPU_REVISION": template.effective_revision,
                 "MGPU_CANARY_GATE": "false"}
        if spec.gpus:  # NVML health watches the first; the engine sees them all
            extra.update(MGPU_GPU=str(spec.gpus[0]), CUDA_VISIBLE_DEVICES=",".join(map(str, spec.gpus)))
        elif template.engine == "vllm":
            extra["MGPU_VLLM_ENFORCE_EAGER"] = "true"
        return {**to_env(template), **extra}

    def spawn_worker(self, slot: int, template: WorkerSettings, *, worker_id: str, gated: bool) -> Child:
        """Start a worker on ``slot`` (held: the caller decides when supervision takes it over)."""
        spec = self.specs[slot]
        c = Child(spec.name, mgpu_cmd("worker"), self.worker_env(slot, template, worker_id), spec.log_path,
                  held=True, template=template)
        c.start(**({"MGPU_CANARY_GATE": "true"} if gated else {}))
        return c

    def surge_worker_id(self, slot: int) -> str:
        self._surges[slot] += 1
        return f"{self.specs[slot].worker_id}-s{self._surges[slot]}"

    def children(self) -> list[Child]:
        return [*self.workers, *(self.rollout.transient if self.rollout is not None else []), self.gateway]

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> int:
        data = self.data
        base = f"http://{self.s.host}:{self.port}"
        announced = False
        started = time.monotonic()
        prom_dir = data / "prometheus"
        targets = TargetsWriter(prom_dir / "workers.json", self.keys)
        try:
            for i, spec in enumerate(self.specs):
                c = self.spawn_worker(i, self.template, worker_id=spec.worker_id, gated=False)
                c.held = False
                self.workers.append(c)
            self.gateway.start()
            write_json_atomic(prom_dir / "gateway.json",
                              static_targets([f"{self.s.host}:{self.port}"], namespace=self.s.namespace))
            self._recover()
            while not stop.wait(TICK_S):
                now = time.monotonic()
                if self._due("targets", now, 2.0):
                    try:
                        targets.refresh(self.registry)
                    except (redis.RedisError, OSError) as exc:
                        log.warning("could not refresh Prometheus targets: %s", exc)
                for c in [*self.workers, self.gateway]:
                    self._supervise(c, now)
                self._control(now)
                if not announced and _ready(base):
                    announced = True
                    print(f"\nmgpu is up in {now - started:.0f}s: {base}/v1  (model: {self.s.model})\n"
                          f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
                          f"-d '{{\"model\": \"{self.s.model}\", \"messages\": [{{\"role\": \"user\", "
                          f"\"content\": \"Hello!\"}}]}}'\n  logs: {data / 'logs'}   stop: Ctrl+C\n", flush=True)
        finally:
            self._shutdown()
        return 0

    def _due(self, what: str, now: float, every: float) -> bool:
        if now < self._next[what]:
            return False
        self._next[what] = now + every
        return True

    def _supervise(self, c: Child, now: float) -> None:
        if c.down or c.held or c.proc is None:
            return
        rc = c.proc.poll()
        if rc is None:
            return
        if c.restart_at == 0.0:
            delay = c.on_exit(now)
            if delay is None:
                log.error("%s crash-loops (%d exits in %.0fs): left down; see %s", c.name,
                          len(c.crashes), CRASH_LOOP_WINDOW_S, c.log_path)
                self._report_down(c)
                return
            c.restart_at = now + delay
            log.warning("%s exited with %s; restarting in %.1fs", c.name, rc, delay)
        elif now >= c.restart_at:
            c.restart_at = 0.0
            c.start()

    def _report_down(self, c: Child) -> None:
        """Show a crash-looping worker in the registry (and so in /workers) as state 'crashloop'."""
        if c.template is None:
            return
        wid = c.worker_id
        try:
            key = self.keys.worker(wid)
            rec = WorkerRecord(id=wid, state=WorkerState.CRASHLOOP, model=c.template.model, exits=len(c.crashes),
                               log=str(c.log_path), revision=c.template.effective_revision)
            self.registry.hset(key, mapping=rec.to_hash())
            self.registry.expire(key, 3600)
            self.registry.sadd(self.keys.workers, wid)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not report %s as down: %s", c.name, exc)

    def _shutdown(self) -> None:
        log.info("shutting down")
        if self._steps is not None and self.rollout is not None:
            self._steps.close()
            st = self.rollout.state
            st.phase, st.finished_at = "failed", time.time()
            st.reason = (st.reason + "; " if st.reason else "") + "the supervisor stopped during the rollout"
            st.event(st.reason)
            self._unwritten = st
        if self._unwritten is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                rollout.write(self.registry, self.keys, self._unwritten, final=True)
        children = self.children()
        for c in children:
            c.signal(signal.SIGTERM)
        for c in children:
            if c.proc is not None:
                terminate(c.proc, timeout=(c.template or self.s).drain_grace_s + 5)
        with contextlib.suppress(redis.RedisError, OSError):
            self.registry.delete(self.keys.supervisor(self.id))
            self.registry.srem(self.keys.supervisors, self.id)
        self.registry.close()

    # ------------------------------------------------------------------ rollouts
    def _control(self, now: float) -> None:
        try:
            if self._due("presence", now, 1.0):
                rollout.publish_supervisor(self.registry, self.keys, self._facts())
            if self._steps is not None:
                self._step(now)
            elif self._unwritten is None and self._due("poll", now, ROLLOUT_POLL_S):
                self._take_request()
            if self._unwritten is not None:
                rollout.write(self.registry, self.keys, self._unwritten, final=True)
                self._unwritten = None
        except (redis.RedisError, OSError) as exc:
            log.warning("rollout control: redis: %s", exc)

    def _facts(self) -> dict[str, Any]:
        return {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
                "revision": self.template.effective_revision, "workers": [c.worker_id for c in self.workers],
                "can_roll_back": bool(self.history),
                "previous_revision": self.history[-1].effective_revision if self.history else None,
                "rollout": self.rollout.state.id if self.rollout is not None else None}

    def _recover(self) -> None:
        """Say what became of a rollout that this supervisor ran before it (re)started."""
        try:
            st = rollout.read(self.registry, self.keys)
            if st is None or st.supervisor != self.id:
                return
            if st.active:
                st.phase, st.finished_at = "failed", time.time()
                st.reason = "the supervisor restarted during the rollout"
                st.event(f"{st.reason}; its workers run its command line's settings "
                         f"({self.template.effective_revision})")
                rollout.write(self.registry, self.keys, st, final=True)
                log.warning("rollout %s: %s", st.id, st.reason)
            elif st.phase == "done" and st.to_revision != self.template.effective_revision:
                log.warning("the last rollout (%s) moved the workers to revision %s; this supervisor starts them "
                            "on its own settings (revision %s): change its flags or roll out again", st.id,
                            st.to_revision, self.template.effective_revision)
        except (redis.RedisError, OSError, ValidationError) as exc:
            log.warning("could not read the last rollout: %s", exc)

    def _take_request(self) -> None:
        st = rollout.read(self.registry, self.keys)
        if st is None or st.phase != "requested" or st.target not in (None, self.id):
            return
        st.supervisor = self.id
        try:
            target = self._plan(st)
        except RolloutError as exc:
            st.phase, st.reason, st.finished_at = "rejected", str(exc), time.time()
            st.event(f"rejected: {exc}")
            rollout.write(self.registry, self.keys, st, final=True, expect="requested")
            log.warning("rollout %s rejected: %s", st.id, exc)
            return
        st.phase, st.started_at = "running", time.time()
        ru = RollingUpdate(self, st, self.template, target)
        if not rollout.write(self.registry, self.keys, st, expect="requested"):
            return  # it expired meanwhile
        ru.dirty = False
        self.rollout, self._steps = ru, ru.steps()
        self._next["write"] = time.monotonic() + STATE_WRITE_S

    def _plan(self, st: RolloutState) -> WorkerSettings:
        """The settings to roll to; raises RolloutError when the request cannot be carried out."""
        n, opt = len(self.workers), st.options
        if n == 0:
            raise RolloutError("this supervisor runs no worker")
        if st.kind == "rollback":
            if not self.history:
                raise RolloutError("no earlier revision to roll back to: no rollout has completed since this "
                                   "supervisor started")
            target = self.history[-1]
        else:
            unknown = sorted(set(st.changes) - set(ROLLOUT_FIELDS))
            if unknown:
                raise RolloutError(f"not settings a rollout can change: {', '.join(unknown)}")
            try:
                target = WorkerSettings.model_validate({**self.template.model_dump(), "revision": None, **st.changes})
            except ValidationError as exc:
                raise RolloutError("invalid settings: " + "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
            if target == self.template:
                raise RolloutError(f"no change: the workers already run these settings "
                                   f"(revision {target.effective_revision})")
        if not opt.surge and not opt.allow_downtime and opt.max_unavailable >= n:
            raise RolloutError(f"with {n} worker(s) and max unavailable {opt.max_unavailable}, no worker would be "
                               "ready while they are replaced (new requests would get 503): use --surge if there "
                               "is room for a second engine, or --allow-downtime")
        return target

    def _step(self, now: float) -> None:
        ru, steps = self.rollout, self._steps
        assert ru is not None and steps is not None
        if self._due("abort", now, ROLLOUT_POLL_S):
            raw = self.registry.get(self.keys.rollout_abort)
            if raw is not None:
                try:
                    ask = json.loads(raw)
                except ValueError:
                    ask = {}
                if isinstance(ask, dict) and ask.get("id") == ru.state.id:
                    self.registry.delete(self.keys.rollout_abort)
                    ru.abort(str(ask.get("by", "?")))
        try:
            next(steps)
        except StopIteration:
            self._finish()
            return
        except Exception as exc:  # a bug or an unforeseen error: stop rolling, say so, supervise as usual
            log.exception("rollout %s stopped on an error", ru.state.id)
            ru.state.phase = "failed"
            ru.state.reason = f"the rollout stopped on an error: {exc!r}"
            ru.state.event(ru.state.reason)
            self._finish()
            return
        if ru.dirty or self._due("write", now, STATE_WRITE_S):
            if not rollout.write(self.registry, self.keys, ru.state):
                log.warning("rollout %s: its state was taken over in Redis", ru.state.id)
            ru.dirty = False

    def _finish(self) -> None:
        ru = self.rollout
        assert ru is not None
        st = ru.state
        st.finished_at = time.time()
        if st.phase == "done":
            if st.kind == "rollback":
                self.history.pop()
            else:
                self.history.append(ru.source)
            self.template = ru.target
        for c in self.workers:  # after a failed rollback, plain supervision restarts what is down
            c.held = False
        for c in ru.transient:
            c.signal(signal.SIGTERM)
        self.rollout, self._steps = None, None
        self._unwritten = st  # written by _control, again on the next tick if Redis does not answer
        level = logging.INFO if st.phase == "done" else logging.WARNING
        log.log(level, "rollout %s %s: %s -> %s in %.1fs%s", st.id, st.phase, st.from_revision, st.to_revision,
                st.finished_at - (st.started_at or st.finished_at), f" ({st.reason})" if st.reason else "")


def run_up(s: UpSettings) -> int:
    data = Path(s.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    (data / "logs").mkdir(mode=0o700, exist_ok=True)
    os.chmod(data / "logs", 0o700)  # the logs name requests, hosts and ports: the owner's only
    redis_server: RedisServer | None = None
    if "redis_url" not in s.model_fields_set:  # neither MGPU_REDIS_URL nor --redis-url: a redis-server of its own
        redis_server = RedisServer(data / "redis", die_with_parent=True, maxmemory=s.redis_maxmemory,
                                   password=secrets.token_urlsafe(24)).start()
        s = s.model_copy(update={"redis_url": redis_server.url})
        url_file = data / "redis-url"  # for `mgpu status`, `mgpu keys`, ... on this host (the owner's only)
        with private_log(url_file) as f:
            f.truncate(0)
            f.write((redis_server.url + "\n").encode())
        log.info("redis-server (AOF, loopback, a password of its own) on %s, data in %s; for other mgpu commands: "
                 "export MGPU_REDIS_URL=$(cat %s)", redacted(redis_server.url), data / "redis", url_file)
    if s.engine == "vllm" and not s.model_path:
        from gpu_worker.model_store import ensure_embedded_model

        log.info("preparing the embedded model (converted once, then cached)")
        s = s.model_copy(update={"model_path": str(ensure_embedded_model(Path(s.model_cache_dir)))})
    visible = visible_gpus()
    gpus = plan_gpus(visible, gpus_per_worker(s.engine_args)) if visible else []
    if gpus:
        log.info("found %d GPU(s): %d worker(s) of %d GPU(s) each", len(visible), len(gpus), len(gpus[0]))
    else:
        log.info("no GPU found: %d CPU worker(s)", s.workers)
    stop = threading.Event()

    def on_signal(_sig: int, _frm: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        return Supervisor(s, data, gpus).run(stop)
    finally:
        if redis_server is not None:
            redis_server.stop()


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/ready", timeout=1) as r:
            return bool(r.status == 200)
    except Exception:
        return False
