"""The supervisor's side of ``mgpu rollout``: replace the workers one slot at a time, gate each new
one, and put the old settings back on every slot already touched when a gate fails.

One slot, drain-first (the default; a GPU has room for one engine)::

    SIGTERM the old worker      it stops pulling, finishes its in-flight requests (drain_grace_s),
                                hands back its unread own-stream entries, deregisters and exits
    start the new worker        same GPU, same worker id, the new settings, in state 'canary': it
                                reads only its own stream, so the gateway sends it nothing yet
    gate                        'canary' within --ready-timeout; --canary N requests pushed to its
                                own stream, each answered by it without error (and, on the sim engine,
                                with the exact expected text); admitted ('ready', Keys.admit); then up
                                and ready for --soak seconds (at least two gateway registry refreshes,
                                so that every gateway sees it before the next worker drains)

With ``--surge`` the new worker (with a new worker id) starts and passes its gate while the old
one still serves, and the old one drains afterwards.  ``--max-unavailable N`` replaces N slots at
once.  Meanwhile the other workers serve and requests wait in the stream: nothing fails.

When a gate fails (the new worker exits, is not ready in time, fails a canary, or leaves 'ready'
during its soak), the failed worker is stopped and every touched slot gets the old settings back,
with the same procedure (ungated, no canary); the rollout ends ``rolled_back`` with the reason, or
``failed`` when the old settings do not come back either.

The procedure is a generator that the supervisor's main loop advances once per tick, so it runs in
the supervisor's one thread, next to the crash restarts (which leave ``held`` children alone).  It sees
the supervisor only through :class:`ops.fleet.Fleet`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Generator
from pathlib import Path

import redis
from pydantic import ValidationError

from common.schemas import Result, WorkItem
from common.settings import WorkerSettings
from ops.fleet import Child, Fleet
from ops.rollout import RolloutState, SlotProgress

log = logging.getLogger("mgpu.rollout")

Steps = Generator[None, None, None]
Outcome = Generator[None, None, "str | None"]  # ends with None (passed) or why it failed

CANARY_TOKENS = 16
KILL_AFTER_S = 10.0  # past drain_grace_s, a worker that has not exited is killed (its entries are reclaimed)


def last_log_line(path: Path, limit: int = 300) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-limit:] if lines else ""


def canary_items(rollout_id: str, worker_id: str, model: str, n: int, deadline: float) -> list[WorkItem]:
    """Plain completions (every model has no chat template, but every model completes), greedy."""
    return [WorkItem(id=f"canary-{rollout_id}-{worker_id}-{i}", kind="completion", model=model,
                     body={"model": model, "prompt": f"mgpu rollout canary {i}: the quick brown fox jumps over",
                           "max_tokens": CANARY_TOKENS, "temperature": 0.0}, deadline=deadline)
            for i in range(n)]


def check_canary(item: WorkItem, res: Result, worker_id: str, engine: str) -> str | None:
    """Why a canary's result is not right, or None."""
    if res.error is not None:
        return f"{res.error.code or res.error.type}: {res.error.message}"
    if res.worker != worker_id:
        return f"answered by {res.worker}, not by the new worker"
    choices = (res.body or {}).get("choices") or [{}]
    text = choices[0].get("text") or ""
    if res.usage.completion_tokens == 0:
        return "no token generated"
    if engine == "sim":
        from gpu_worker.engine.sim import expected_text

        if text != expected_text(item.body["prompt"], max_tokens=CANARY_TOKENS):
            return f"wrong text {text[:60]!r}"
    return None


class RollingUpdate:
    """One rollout (or rollback) of a fleet from ``source`` to ``target``; :meth:`steps` is the procedure."""

    def __init__(self, fleet: Fleet, state: RolloutState, source: WorkerSettings, target: WorkerSettings) -> None:
        self.fleet = fleet
        self.state = state
        self.source = source
        self.target = target
        self.opt = state.options
        self.before = list(fleet.slots())  # the processes of each slot when the rollout began
        self.was_running = [w.running for w in self.before]
        # started besides the slots' processes: a surge worker in its gate, an old one draining after a surge
        self.transient: list[Child] = []
        self.dirty = True  # the state changed since it was last written to Redis
        self.aborted: str | None = None  # set by abort(): the gate in progress fails with this reason
        state.from_revision = self.source.effective_revision
        state.to_revision = target.effective_revision
        state.slots = [SlotProgress(slot=w.name, worker=w.worker_id, from_revision=state.from_revision,
                                    to_revision=state.to_revision, pid=w.pid()) for w in self.before]

    def abort(self, by: str) -> None:
        if self.aborted is None and self.state.phase == "running":
            self.aborted = f"aborted by {by}"
            self._event(self.aborted, level=logging.WARNING)

    # ------------------------------------------------------------------ bookkeeping
    def _event(self, message: str, *, level: int = logging.INFO) -> None:
        log.log(level, "rollout %s: %s", self.state.id, message)
        self.state.event(message)
        self.dirty = True

    def _progress(self, slot: int, phase: str, detail: str | None = None) -> None:
        p = self.state.slots[slot]
        p.phase = phase
        if detail is not None:
            p.detail = detail
        self.dirty = True

    def _registry_state(self, worker_id: str) -> str | None:
        """The worker's registry state; "unknown" while Redis does not answer."""
        try:
            v = self.fleet.registry.hget(self.fleet.keys.worker(worker_id), "state")
        except (redis.RedisError, OSError):
            return "unknown"
        return v.decode() if isinstance(v, bytes) else v

    def _stopped(self, w: Child) -> str | None:
        """Why the gate of ``w`` cannot pass any more: it exited, or the rollout was aborted (which
        stops the way forward, not the way back)."""
        return self._exited(w) or (self.aborted if self.state.phase == "running" else None)

    @staticmethod
    def _exited(w: Child) -> str | None:
        rc = w.poll()
        if rc is None:
            return None
        tail = last_log_line(w.log_path)
        return f"{w.worker_id} exited with code {rc}" + (f" ({tail})" if tail else "")

    # ------------------------------------------------------------------ the procedure
    def steps(self) -> Steps:
        st = self.state
        k = self.opt.max_unavailable
        order = list(range(len(self.before)))
        self._event(f"{st.kind} {st.from_revision} -> {st.to_revision} on {len(order)} worker(s), "
                    f"{'surge' if self.opt.surge else 'drain-first'}, {k} at a time")
        touched: list[int] = []
        failures: dict[int, str] = {}
        for at in range(0, len(order), k):
            if self.aborted:
                failures = {order[at]: self.aborted}
                self._progress(order[at], "not started", self.aborted)
                break
            batch = order[at:at + k]
            touched += batch
            failures = yield from self._parallel(
                {i: self._replace(i, self.target, canary=self.opt.canary) for i in batch})
            if failures:
                break
        if not failures:
            st.phase = "done"
            self._event(f"done: every worker runs {st.to_revision}")
            return
        st.phase = "rolling_back"
        st.reason = "; ".join(f"{self.state.slots[i].slot}: {why}" for i, why in sorted(failures.items()))
        self._event(f"gate failed ({st.reason}); restoring {st.from_revision} on {len(touched)} slot(s)",
                    level=logging.WARNING)
        lost: dict[int, str] = {}
        for at in range(0, len(touched), k):
            lost.update((yield from self._parallel({i: self._restore(i) for i in touched[at:at + k]})))
        if lost:
            st.phase = "failed"
            st.reason += "; rollback failed: " + "; ".join(
                f"{self.state.slots[i].slot}: {why}" for i, why in sorted(lost.items()))
            self._event(f"rollback failed: {len(lost)} slot(s) did not come back on {st.from_revision}",
                        level=logging.ERROR)
        else:
            st.phase = "rolled_back"
            self._event(f"rolled back: every worker runs {st.from_revision}")
        for p in st.slots:
            if p.phase == "waiting":
                p.phase, p.to_revision = "not reached", st.from_revision

    def _parallel(self, outcomes: dict[int, Outcome]) -> Generator[None, None, dict[int, str]]:
        """Advance several slots' procedures together; the failures, by slot."""
        failures: dict[int, str] = {}
        while outcomes:
            for i, gen in list(outcomes.items()):
                try:
                    next(gen)
                except StopIteration as stop:
                    del outcomes[i]
                    if stop.value:
                        failures[i] = stop.value
            if outcomes:
                yield
        return failures

    def _replace(self, i: int, template: WorkerSettings, *, canary: int, restoring: bool = False) -> Outcome:
        f = self.fleet
        old = f.slots()[i]
        surge = self.opt.surge and old.running
        verb = "restoring" if restoring else "updating"
        if old.running and not surge:
            self._progress(i, "draining")
            self._event(f"{verb} {old.name}: draining {old.worker_id}")
            yield from self._retire(old)
        wid = f.surge_worker_id(i) if surge else old.worker_id
        new = f.spawn_worker(i, template, worker_id=wid, gated=canary > 0)
        if surge:
            self.transient.append(new)
        else:
            f.assign(i, new)
        p = self.state.slots[i]
        p.worker, p.pid = wid, new.pid()
        self._progress(i, "restoring" if restoring else "starting", "")
        self._event(f"{verb} {new.name}: started {wid} (pid {new.pid()}, revision {template.effective_revision})")
        why = yield from self._gate(i, new, template, canary, soak_s=0.0 if restoring else self.opt.soak_s)
        if why:
            self._progress(i, "failed", why)
            self._event(f"{new.name}: {why}", level=logging.WARNING)
            yield from self._retire(new)
            if surge:
                self.transient.remove(new)
                p.worker, p.pid = old.worker_id, old.pid()
            return why
        if surge:
            self.transient.remove(new)
            f.assign(i, new)
            self._progress(i, "draining")
            self._event(f"{new.name}: draining the old worker {old.worker_id}")
            self.transient.append(old)
            yield from self._retire(old)
            self.transient.remove(old)
        new.held = False
        self._progress(i, "restored" if restoring else "updated")
        self._event(f"{new.name}: {wid} serves on {template.effective_revision}")
        return None

    def _restore(self, i: int) -> Outcome:
        """Put the slot back as it was before the rollout (settings; running or down)."""
        cur = self.fleet.slots()[i]
        if not self.was_running[i]:  # it was down (crash loop) before: leave it down, as it was
            if cur is not self.before[i]:
                yield from self._retire(cur)
                self.fleet.assign(i, self.before[i])
            self._progress(i, "down", "was down before the rollout")
            return None
        if cur is self.before[i] and cur.running:  # a surge whose new worker failed: the old one still serves
            self.state.slots[i].to_revision = self.state.from_revision
            self._progress(i, "restored")
            return None
        self.state.slots[i].to_revision = self.state.from_revision
        return (yield from self._replace(i, self.source, canary=0, restoring=True))

    def _gate(self, i: int, w: Child, template: WorkerSettings, canary: int, *, soak_s: float) -> Outcome:
        opt, keys, r = self.opt, self.fleet.keys, self.fleet.registry
        wid = w.worker_id
        t0 = time.monotonic()
        deadline = t0 + opt.ready_timeout_s
        want = "canary" if canary else "ready"
        if why := (yield from self._until_state(w, want, deadline, f"was not {want}")):
            return why
        detail = f"up in {time.monotonic() - t0:.1f}s"
        self._progress(i, want, detail)
        if canary:
            if why := (yield from self._canary(w, template, canary, deadline)):
                return why
            detail += f", canary {canary}/{canary} ok"
            self._progress(i, "admitting", detail)
            try:
                r.set(keys.admit(wid), "1", ex=max(60, int(opt.ready_timeout_s)))
            except (redis.RedisError, OSError) as exc:
                return f"could not admit {wid}: {exc}"
            if why := (yield from self._until_state(w, "ready", deadline, "was admitted but not ready")):
                return why
        soak = max(soak_s, 2 * self.fleet.registry_refresh_s)
        self._progress(i, "soak", detail)
        until = time.monotonic() + soak
        while time.monotonic() < until:
            if why := self._stopped(w):
                return why + " during its soak"
            state = self._registry_state(wid)
            if state not in ("ready", "unknown"):
                return f"{wid} left 'ready' during its soak (state: {state})"
            yield
        self._progress(i, "soak", detail + f", {soak:g}s soak ok")
        return None

    def _canary(self, w: Child, template: WorkerSettings, canary: int, deadline: float) -> Outcome:
        """Send ``canary`` requests to ``w``'s own stream; None when it answered every one rightly."""
        opt, keys, r = self.opt, self.fleet.keys, self.fleet.registry
        wid = w.worker_id
        items = canary_items(self.state.id, wid, template.model, canary, time.time() + opt.ready_timeout_s)
        try:
            with r.pipeline(transaction=False) as p:
                for item in items:
                    p.xadd(keys.worker_stream(template.model, wid), item.to_fields())
                p.execute()
        except (redis.RedisError, OSError) as exc:
            return f"could not send the canary requests: {exc}"
        self._event(f"{w.name}: {canary} canary request(s) sent to {wid}")
        while True:
            if why := self._stopped(w):
                return why
            try:
                raws = r.mget([keys.result(item.model, item.id) for item in items])
            except (redis.RedisError, OSError):
                raws = [None] * len(items)
            if all(raw is not None for raw in raws):
                break
            if time.monotonic() > deadline:
                done = sum(raw is not None for raw in raws)
                return f"{wid} answered {done} of {canary} canary request(s) within {opt.ready_timeout_s:g}s"
            yield
        with contextlib.suppress(redis.RedisError, OSError):
            r.delete(*[keys.result(item.model, item.id) for item in items])
        for item, raw in zip(items, raws):
            try:
                bad = check_canary(item, Result.model_validate_json(raw), wid, template.engine)
            except ValidationError as exc:
                bad = f"unreadable result: {exc}"
            if bad:
                return f"canary {item.id} failed: {bad}"
        return None

    def _until_state(self, w: Child, want: str, deadline: float, failed: str) -> Outcome:
        """Until the registry shows ``w`` in state ``want``; None, or why it did not get there."""
        while (state := self._registry_state(w.worker_id)) != want:
            if why := self._stopped(w):
                return why
            if time.monotonic() > deadline:
                return (f"{w.worker_id} {failed} within {self.opt.ready_timeout_s:g}s "
                        f"(state: {state or 'not registered'})")
            yield
        return None

    def _retire(self, w: Child) -> Steps:
        """Drain a worker (SIGTERM) and wait until it has exited; kill it past its drain grace."""
        w.held = True
        if not w.running:
            return
        w.signal(signal.SIGTERM)
        grace = (w.template.drain_grace_s if w.template is not None else self.source.drain_grace_s) + KILL_AFTER_S
        until = time.monotonic() + grace
        killed = False
        while w.poll() is None:
            if not killed and time.monotonic() > until:
                self._event(f"{w.worker_id} still running {grace:g}s after SIGTERM: killed (its requests are "
                            "reclaimed by the others)", level=logging.WARNING)
                w.signal(signal.SIGKILL)
                killed = True
            yield

