"""``mgpu rollout``: rolling updates of the workers of a running ``mgpu up``, kept in Redis.

    mgpu rollout --set sim_decode_ms=5 --set revision=v2   roll every worker to new settings
    mgpu rollout --model /models/llama-v2                   a new model folder (the served name stays)
    mgpu rollout --status [--json]                          the current or last rollout
    mgpu rollout --rollback                                 back to the settings before the last rollout
    mgpu rollout --abort                                    stop the running rollout and roll it back
    mgpu rollout --history

This module holds what the command and the supervisor share: the request and its state
(:class:`RolloutState`, one JSON document at ``Keys.rollout``), the two Lua steps that guard it, and
the command itself.  The supervisor's side, which replaces the workers, is :mod:`ops.rolling`.

Protocol: the command checks that a supervisor is alive (``Keys.supervisor``), then writes its
request in phase ``requested`` together with the lock (``ROLLOUT_REQUEST``, refused while another
rollout holds the lock).  Each supervisor polls the state from its main loop, takes a request
addressed to it (or to any supervisor), and from then on is the only writer (``ROLLOUT_WRITE``),
renewing the lock on every write, until a final phase releases it::

    requested -> running -> done
                         -> rolling_back -> rolled_back    (a gate failed; the old settings are back)
                                         -> failed         (the old settings did not come back either)
    requested -> rejected (the supervisor refused the request) | expired (no supervisor took it)
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
import time
import uuid
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field, ValidationError

from common.keys import Keys
from common.redis_conn import sync_client
from common.settings import ROLLOUT_FIELDS, ControlSettings, WorkerSettings

Phase = Literal["requested", "running", "rolling_back", "done", "rolled_back", "failed", "rejected", "expired"]
ACTIVE_PHASES = ("requested", "running", "rolling_back")
LOCK_TTL_MS = 15_000  # a rollout whose supervisor stopped renewing this long no longer blocks others
ACCEPT_TIMEOUT_S = 10.0  # how long the command waits for a supervisor to take its request
SUPERVISOR_TTL_MS = 5_000
HISTORY = 20
MAX_EVENTS = 200

# A rollout request (ops.rollout): at most one rollout is requested or runs per namespace.  The lock
# holds the rollout's id with a TTL that the supervisor running it renews, so a rollout whose
# supervisor died stops blocking new ones once the TTL passes.
# KEYS: lock, state   ARGV: rollout id, state_json, lock_ttl_ms
# -> {1, ''} requested | {0, state_json of the rollout that holds the lock}
ROLLOUT_REQUEST = """
if redis.call('GET', KEYS[1]) then return {0, redis.call('GET', KEYS[2]) or ''} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2])
return {1, ''}
"""

# Write a rollout's state, if it is still that rollout's: the state key holds its id, and the lock is
# its own (a final write may also land after the lock passed).  A final write releases the lock and
# adds the state to the history; any other renews the lock.
# KEYS: lock, state, history   ARGV: rollout id, state_json, lock_ttl_ms, final('1'/'0'),
#       expected current phase ('' for any), history length
# -> 1 written | 0 not this rollout's any more, or not in the expected phase
ROLLOUT_WRITE = """
local holder = redis.call('GET', KEYS[1])
if (holder and holder ~= ARGV[1]) or (not holder and ARGV[4] ~= '1') then return 0 end
local cur = redis.call('GET', KEYS[2])
if not cur then return 0 end
local st = cjson.decode(cur)
if st.id ~= ARGV[1] or (ARGV[5] ~= '' and st.phase ~= ARGV[5]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
if ARGV[4] == '1' then
  if holder then redis.call('DEL', KEYS[1]) end
  redis.call('LPUSH', KEYS[3], ARGV[2])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
end
return 1
"""


class RolloutOptions(BaseModel):
    max_unavailable: int = Field(default=1, ge=1)  # workers replaced at once (with surge: extra engines at once)
    surge: bool = False  # start the new worker first, then drain the old one (room for two engines needed)
    ready_timeout_s: float = Field(default=300.0, gt=0)  # to reach 'ready' and pass the canary
    canary: int = Field(default=3, ge=0, le=100)  # requests the new worker must answer correctly first
    soak_s: float = Field(default=5.0, ge=0)  # a new worker must stay up and ready this long
    allow_downtime: bool = False  # let a drain-first rollout take every worker down at once


class SlotProgress(BaseModel):
    slot: str
    worker: str
    from_revision: str
    to_revision: str
    # waiting | draining | starting | canary | admitting | soak | updated | failed | restoring | restored | down
    phase: str = "waiting"
    detail: str = ""
    pid: int | None = None


class RolloutState(BaseModel):
    id: str
    kind: Literal["rollout", "rollback"] = "rollout"
    phase: Phase = "requested"
    changes: dict[str, str] = Field(default_factory=dict)
    options: RolloutOptions = Field(default_factory=RolloutOptions)
    target: str | None = None  # the supervisor asked for (None: any)
    supervisor: str | None = None  # the supervisor that took it
    requested_by: str = ""
    requested_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    from_revision: str = ""
    to_revision: str = ""
    slots: list[SlotProgress] = Field(default_factory=list)
    reason: str = ""
    events: list[str] = Field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    def event(self, message: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {message}")
        del self.events[:-MAX_EVENTS]


class RolloutError(Exception):
    """A rollout cannot be requested or run as asked; the message says why."""


# ----------------------------------------------------------------------------- state in Redis


def read(r: redis.Redis, keys: Keys) -> RolloutState | None:
    raw = r.get(keys.rollout)
    return None if raw is None else RolloutState.model_validate_json(raw)


def history(r: redis.Redis, keys: Keys, n: int = HISTORY) -> list[RolloutState]:
    return [RolloutState.model_validate_json(raw) for raw in r.lrange(keys.rollout_history, 0, n - 1)]


def request(r: redis.Redis, keys: Keys, state: RolloutState) -> RolloutState | None:
    """Write a new request; ``None`` when it is in, else the rollout that holds the lock."""
    ok, held = r.eval(ROLLOUT_REQUEST, 2, keys.rollout_lock, keys.rollout, state.id, state.model_dump_json(),
                      LOCK_TTL_MS)
    if ok:
        return None
    if held:
        return RolloutState.model_validate_json(held)
    return RolloutState(id="?", phase="running", reason="the lock is held but the state key is missing")


def write(r: redis.Redis, keys: Keys, state: RolloutState, *, final: bool = False, expect: str = "") -> bool:
    """Store ``state`` if the state key still holds this rollout (in phase ``expect`` when given)."""
    return bool(r.eval(ROLLOUT_WRITE, 3, keys.rollout_lock, keys.rollout, keys.rollout_history, state.id,
                       state.model_dump_json(), LOCK_TTL_MS, "1" if final else "0", expect, HISTORY))


def publish_supervisor(r: redis.Redis, keys: Keys, facts: dict[str, Any]) -> None:
    with r.pipeline(transaction=False) as p:
        p.set(keys.supervisor(facts["id"]), json.dumps(facts), px=SUPERVISOR_TTL_MS)
        p.sadd(keys.supervisors, facts["id"])
        p.execute()


def live_supervisors(r: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    ids = sorted(i.decode() if isinstance(i, bytes) else str(i) for i in r.smembers(keys.supervisors))
    if not ids:
        return []
    raws = r.mget([keys.supervisor(i) for i in ids])
    gone = [i for i, raw in zip(ids, raws) if raw is None]
    if gone:
        r.srem(keys.supervisors, *gone)
    return [json.loads(raw) for raw in raws if raw is not None]


# ----------------------------------------------------------------------------- the command


def parse_changes(pairs: list[str], model_path: str | None) -> dict[str, str]:
    """``--set NAME=VALUE`` (and ``--model PATH``) into checked changes; raises RolloutError."""
    changes: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise RolloutError(f"--set {pair!r}: expected NAME=VALUE")
        if name == "model":
            raise RolloutError("a rollout keeps the served model name (clients address it); use --model PATH "
                               "for a new model folder under the same name")
        if name not in ROLLOUT_FIELDS:
            raise RolloutError(f"--set {name}: not a setting a rollout can change; one of: {', '.join(ROLLOUT_FIELDS)}")
        changes[name] = value
    if model_path:
        local = os.path.abspath(os.path.expanduser(model_path))
        changes["model_path"] = local if os.path.exists(local) else model_path
    try:  # types and ranges, as the workers will check them
        WorkerSettings.load(changes, env={})
    except ValueError as exc:
        raise RolloutError(str(exc)) from None
    return changes


def abort(r: redis.Redis, keys: Keys) -> RolloutState:
    """Ask the supervisor to stop the running rollout and roll back what it touched."""
    st = read(r, keys)
    if st is None or not st.active:
        raise RolloutError("no rollout is in progress")
    if st.phase == "rolling_back":
        raise RolloutError(f"rollout {st.id} is already rolling back")
    r.set(keys.rollout_abort, json.dumps({"id": st.id, "by": f"{getpass.getuser()}@{socket.gethostname()}"}),
          ex=600)
    return st


def _pick_supervisor(r: redis.Redis, keys: Keys, wanted: str | None) -> dict[str, Any]:
    sups = live_supervisors(r, keys)
    if wanted:
        for sup in sups:
            if sup["id"] == wanted:
                return sup
        raise RolloutError(f"no running supervisor {wanted!r} in namespace {keys.ns!r} "
                           f"(running: {', '.join(s['id'] for s in sups) or 'none'})")
    if not sups:
        raise RolloutError(f"no `mgpu up` supervisor is running in namespace {keys.ns!r}: rollouts are carried "
                           "out by it (see docs/rollouts.md)")
    if len(sups) > 1:
        raise RolloutError(f"{len(sups)} supervisors share namespace {keys.ns!r} "
                           f"({', '.join(s['id'] for s in sups)}): name one with --supervisor ID")
    return sups[0]


def start(r: redis.Redis, keys: Keys, *, changes: dict[str, str], options: RolloutOptions, rollback: bool = False,
          supervisor: str | None = None, accept_timeout_s: float = ACCEPT_TIMEOUT_S) -> RolloutState:
    """Request a rollout and wait until a supervisor took it (or refused it); raises RolloutError."""
    sup = _pick_supervisor(r, keys, supervisor)
    if rollback and not sup.get("can_roll_back"):
        raise RolloutError(f"supervisor {sup['id']} has no earlier revision to roll back to (it has completed "
                           "no rollout since it started)")
    state = RolloutState(id="ro-" + uuid.uuid4().hex[:8], kind="rollback" if rollback else "rollout",
                         changes=changes, options=options, target=sup["id"],
                         requested_by=f"{getpass.getuser()}@{socket.gethostname()}", requested_at=time.time())
    held = request(r, keys, state)
    if held is not None:
        raise RolloutError(f"another rollout is in progress: {held.id} ({held.phase}, "
                           f"{held.from_revision or '?'} -> {held.to_revision or '?'}, by {held.requested_by or '?'}); "
                           "follow it with `mgpu rollout --status` and try again when it has finished")
    deadline = time.monotonic() + accept_timeout_s
    while time.monotonic() < deadline:
        cur = read(r, keys)
        if cur is None or cur.id != state.id:
            raise RolloutError("the rollout request vanished (was Redis flushed?)")
        if cur.phase != "requested":
            if cur.phase == "rejected":
                raise RolloutError(f"supervisor {cur.supervisor} refused the rollout: {cur.reason}")
            return cur
        time.sleep(0.1)
    state.phase, state.finished_at = "expired", time.time()
    state.reason = f"no supervisor took the request within {accept_timeout_s:.0f}s"
    if write(r, keys, state, final=True, expect="requested"):
        raise RolloutError(state.reason)
    cur = read(r, keys)  # taken at the last moment
    assert cur is not None
    return cur


def follow(r: redis.Redis, keys: Keys, rollout_id: str, *, out: Any = sys.stdout, poll_s: float = 0.25) -> RolloutState:
    """Print the rollout's events as they come, until it ends."""
    seen = 0
    while True:
        st = read(r, keys)
        if st is None or st.id != rollout_id:
            raise RolloutError(f"rollout {rollout_id} is no longer the current one")
        for line in st.events[seen:]:
            print(f"  {line}", file=out, flush=True)
        seen = len(st.events)
        if not st.active:
            return st
        time.sleep(poll_s)


def _ago(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def render(st: RolloutState, *, events: int = 12) -> str:
    took = ""
    if st.started_at is not None:
        took = f", {((st.finished_at or time.time()) - st.started_at):.1f}s"
    opts = st.options
    how = "surge (new first)" if opts.surge else "drain-first"
    lines = [
        f"rollout {st.id}  {st.kind}  {st.phase.upper()}{took}",
        f"  revision   {st.from_revision or '?'} -> {st.to_revision or '?'}",
        f"  changes    {', '.join(f'{k}={v}' for k, v in st.changes.items()) or '(back to the previous settings)'}",
        f"  supervisor {st.supervisor or st.target or '?'}   requested by {st.requested_by} at {_ago(st.requested_at)}",
        f"  plan       {how}, max unavailable {opts.max_unavailable}, canary {opts.canary}, soak {opts.soak_s:g}s, "
        f"ready timeout {opts.ready_timeout_s:g}s",
    ]
    if st.reason:
        lines.append(f"  reason     {st.reason}")
    if st.slots:
        widths = [max(len(h), *(len(v) for v in col)) for h, col in zip(
            ("SLOT", "WORKER", "FROM", "TO", "PHASE"),
            zip(*[(p.slot, p.worker, p.from_revision, p.to_revision, p.phase) for p in st.slots]))]
        head = ("SLOT", "WORKER", "FROM", "TO", "PHASE", "DETAIL")
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(head, [*widths, 0])).rstrip())
        for p in st.slots:
            cells = (p.slot, p.worker, p.from_revision, p.to_revision, p.phase)
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + p.detail)
    if st.events and events:
        lines.append("  events")
        lines += [f"    {e}" for e in st.events[-events:]]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="changes", action="append", default=[], metavar="NAME=VALUE",
                   help=f"a worker setting to change (repeatable): {', '.join(ROLLOUT_FIELDS)}")
    p.add_argument("--model", dest="rollout_model", default=None, metavar="PATH",
                   help="a new model folder for the workers (the served model name stays)")
    p.add_argument("--status", action="store_true", help="show the current or last rollout")
    p.add_argument("--history", action="store_true", help="list the last finished rollouts")
    p.add_argument("--json", action="store_true", help="with --status / --history: JSON")
    p.add_argument("--rollback", action="store_true", help="roll back to the settings before the last rollout")
    p.add_argument("--abort", action="store_true", help="stop the running rollout and roll back what it changed")
    p.add_argument("--wait", action="store_true", help="follow the rollout until it ends (exit 1 unless done)")
    p.add_argument("--supervisor", dest="target_supervisor", default=None, metavar="ID",
                   help="the `mgpu up` to roll (needed when several share the namespace)")
    d = RolloutOptions()
    p.add_argument("--max-unavailable", type=int, default=d.max_unavailable, metavar="N",
                   help="workers replaced at once (default %(default)s)")
    p.add_argument("--surge", action="store_true",
                   help="start each new worker before draining its old one (needs room for two engines)")
    p.add_argument("--ready-timeout", type=float, default=d.ready_timeout_s, metavar="S",
                   help="a new worker must be ready and pass its canary within S seconds (default %(default)s)")
    p.add_argument("--canary", type=int, default=d.canary, metavar="N",
                   help="requests a new worker must answer correctly before it takes client traffic "
                        "(default %(default)s)")
    p.add_argument("--soak", type=float, default=d.soak_s, metavar="S",
                   help="a new worker must then stay up and ready S seconds (default %(default)s)")
    p.add_argument("--allow-downtime", action="store_true",
                   help="allow a drain-first rollout to take all workers down at once")


def run_command(s: ControlSettings, ns: argparse.Namespace) -> int:
    r = sync_client(s.redis_dsn, socket_timeout=5, socket_connect_timeout=2)
    keys = s.keys
    try:
        if ns.status or ns.history:
            states = history(r, keys) if ns.history else [st for st in [read(r, keys)] if st is not None]
            if ns.json:
                print(json.dumps([st.model_dump() for st in states] if ns.history else
                                 (states[0].model_dump() if states else None), indent=2))
            elif not states:
                print("no rollout yet")
            else:
                print("\n".join(render(st, events=0 if ns.history else 12) for st in states), end="")
            return 0
        if ns.abort:
            st = abort(r, keys)
            print(f"asked supervisor {st.supervisor} to stop rollout {st.id} and roll it back", flush=True)
            if ns.wait:
                print(render(follow(r, keys, st.id), events=0), end="")
            return 0
        options = RolloutOptions(max_unavailable=ns.max_unavailable, surge=ns.surge, ready_timeout_s=ns.ready_timeout,
                                 canary=ns.canary, soak_s=ns.soak, allow_downtime=ns.allow_downtime)
        changes = parse_changes(ns.changes, ns.rollout_model)
        if ns.rollback and changes:
            raise RolloutError("--rollback restores the previous settings: it takes no --set / --model")
        if not ns.rollback and not changes:
            raise RolloutError("nothing to roll out: give --set NAME=VALUE, --model PATH or --rollback "
                               "(or --status)")
        st = start(r, keys, changes=changes, options=options, rollback=ns.rollback, supervisor=ns.target_supervisor)
        print(f"rollout {st.id} ({st.kind}) taken by {st.supervisor}: {st.from_revision} -> {st.to_revision}, "
              f"{len(st.slots)} worker(s)", flush=True)
        if not ns.wait:
            print("follow it with: mgpu rollout --status")
            return 0
        st = follow(r, keys, st.id)
        print(render(st, events=0), end="")
        return 0 if st.phase == "done" else 1
    except RolloutError as exc:
        print(f"mgpu rollout: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # leaving --wait does not stop the rollout: the supervisor carries it out
        print("\nstopped following; the rollout goes on (mgpu rollout --status, --abort)", file=sys.stderr)
        return 130
    except (ValidationError, redis.RedisError, OSError) as exc:
        print(f"mgpu rollout: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        r.close()
