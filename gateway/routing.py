"""Load-balancing strategies: where the gateway appends a request.

``pull`` (the default) appends every request to the model's shared stream and lets workers take
what their free slots allow.  The push strategies pick one worker and append to that worker's own
stream (``Keys.worker_stream``); workers read their own stream first, then the shared one::

    round_robin      fixed cycle over the ready workers (sorted by id; a gone worker is skipped)
    least_loaded     lowest (in_flight + queued + pushed here since the last refresh) / slots
    weighted         smooth weighted round-robin over the workers' ``weight`` (default: slots)
    prefix_affinity  consistent hashing (virtual nodes) of the user / session / prompt prefix;
                     bounded load: when the owner has no free slot the request spills to the
                     shared stream instead of queueing behind it

The pickers are pure (their state is explicit) so that they can be tested without Redis; the
:class:`Balancer` holds one gateway's state and resolves the strategy in force from the control
hash that the registry refresh already reads (no Redis read per request).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.keys import Keys
from common.scripts import Target
from common.settings import STRATEGIES

if TYPE_CHECKING:
    from gateway.registry import RegistryView

log = logging.getLogger("mgpu.gateway.routing")

SHARED = "shared"  # label of the shared stream in counters


@dataclass(frozen=True)
class Candidate:
    """A ready worker as the gateway sees it (registry counts, possibly a heartbeat old)."""

    id: str
    slots: int
    in_flight: int = 0
    queued: int = 0  # undelivered entries in its own stream
    weight: float = 0.0  # <= 0: use slots

    @property
    def share(self) -> float:
        return self.weight if self.weight > 0 else float(max(self.slots, 1))


# ----------------------------------------------------------------------------- pure pickers


def pick_round_robin(cands: Sequence[Candidate], last: str | None) -> str:
    """The ready worker after ``last`` in id order (wrapping): a fixed cycle that survives a worker
    leaving or joining without restarting."""
    ids = sorted(c.id for c in cands)
    if last is None:
        return ids[0]
    i = bisect.bisect_right(ids, last)
    return ids[i % len(ids)]


def load(c: Candidate, local: Mapping[str, int]) -> int:
    return c.in_flight + c.queued + local.get(c.id, 0)


def pick_least_loaded(cands: Sequence[Candidate], local: Mapping[str, int], turn: int = 0) -> str:
    """Lowest load / slots; ties are broken in rotation (``turn``), not always towards one id."""
    best: list[str] = []
    best_score = float("inf")
    for c in sorted(cands, key=lambda c: c.id):
        score = load(c, local) / max(c.slots, 1)
        if score < best_score - 1e-12:
            best, best_score = [c.id], score
        elif abs(score - best_score) <= 1e-12:
            best.append(c.id)
    return best[turn % len(best)]


def pick_weighted(cands: Sequence[Candidate], current: dict[str, float]) -> str:
    """Smooth weighted round-robin (as nginx does it): exact shares over every cycle, interleaved.
    ``current`` is the picker's state; entries of workers no longer present are dropped."""
    present = {c.id for c in cands}
    for gone in [k for k in current if k not in present]:
        del current[gone]
    total = 0.0
    chosen: Candidate | None = None
    for c in sorted(cands, key=lambda c: c.id):
        current[c.id] = current.get(c.id, 0.0) + c.share
        total += c.share
        if chosen is None or current[c.id] > current[chosen.id]:
            chosen = c
    assert chosen is not None
    current[chosen.id] -= total
    return chosen.id


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class HashRing:
    """Consistent hashing with ``vnodes`` points per worker: adding or removing one of N workers
    moves about 1/N of the keys."""

    points: tuple[int, ...]
    owners: tuple[str, ...]

    @classmethod
    def build(cls, ids: Iterable[str], vnodes: int) -> HashRing:
        pts = sorted((_h64(f"{wid}#{v}"), wid) for wid in ids for v in range(vnodes))
        return cls(tuple(p for p, _ in pts), tuple(o for _, o in pts))

    def owner(self, key: str) -> str:
        i = bisect.bisect_right(self.points, _h64(key))
        return self.owners[i % len(self.owners)]


def pick_affinity(cands: Sequence[Candidate], ring: HashRing, key: str, local: Mapping[str, int]) -> str | None:
    """The key's owner while it has a free slot; ``None`` (the shared stream) when it is full."""
    owner = ring.owner(key)
    for c in cands:
        if c.id == owner:
            return owner if load(c, local) < c.slots else None
    return None


def affinity_key(user: str | None, session: str | None, prompt_text: str, prefix_chars: int) -> str:
    """What prefix_affinity hashes: the ``user`` field, else a session id, else the prompt's prefix."""
    if user:
        return "u:" + user
    if session:
        return "s:" + session
    return "p:" + prompt_text[:prefix_chars]


# ----------------------------------------------------------------------------- per-gateway state


@dataclass(frozen=True)
class Route:
    """Where one request goes: a worker's own stream or the shared one (``destination``, as ENQUEUE
    takes it), under which strategy, and the registry refresh it was counted under."""

    strategy: str
    target: str | None  # a worker id (its own stream), or None (the shared stream)
    destination: Target
    epoch: int = 0  # the registry refresh it was counted under (see Balancer.done)


@dataclass
class _ModelState:
    last_rr: str | None = None
    wrr: dict[str, float] = field(default_factory=dict)
    ll_turn: int = 0
    ring_ids: tuple[str, ...] = ()
    ring: HashRing | None = None


@dataclass
class Balancer:
    """One gateway's routing state.  Call :meth:`route` per request with the ready workers."""

    default: str = "pull"
    gateway_id: str = ""
    prefix_chars: int = 256
    vnodes: int = 64
    pushed: dict[str, int] = field(default_factory=dict)  # worker (or SHARED) -> requests routed there
    # pushed since the registry was last refreshed and not finished yet: what the registry's counts miss
    local: dict[str, int] = field(default_factory=dict)
    epoch: int = 0
    _models: dict[str, _ModelState] = field(default_factory=dict)
    _seen_refresh: float = -1.0
    _bad: str | None = None

    def strategy(self, control: Mapping[str, str]) -> str:
        """The strategy in force: ``strategy:{gateway}`` of the control hash, else ``strategy``,
        else this gateway's setting.  Unknown values are ignored (logged once)."""
        for k in (f"strategy:{self.gateway_id}", "strategy"):
            v = control.get(k)
            if v:
                if v in STRATEGIES:
                    return v
                if v != self._bad:
                    log.warning("ignoring unknown strategy %r in the control hash (field %s)", v, k)
                    self._bad = v
        return self.default

    def on_refresh(self, refreshed_at: float) -> None:
        """Fresh registry counts include what was pushed before: restart the local counts."""
        if refreshed_at != self._seen_refresh:
            self._seen_refresh = refreshed_at
            self.epoch += 1
            self.local.clear()

    def done(self, route: Route) -> None:
        """A pushed request finished: it no longer loads its worker (unless a refresh already
        folded it into the registry's counts)."""
        t = route.target
        if t is not None and route.epoch == self.epoch and self.local.get(t, 0) > 0:
            self.local[t] -= 1

    def route(self, strategy: str, model: str, cands: Sequence[Candidate], key: str = "") -> str | None:
        """The worker whose own stream gets the request, or ``None`` for the shared stream."""
        if strategy == "pull" or not cands:
            return None
        st = self._models.setdefault(model, _ModelState())
        target: str | None
        if strategy == "round_robin":
            target = st.last_rr = pick_round_robin(cands, st.last_rr)
        elif strategy == "least_loaded":
            target = pick_least_loaded(cands, self.local, st.ll_turn)
            st.ll_turn += 1
        elif strategy == "weighted":
            target = pick_weighted(cands, st.wrr)
        elif strategy == "prefix_affinity":
            ids = tuple(sorted(c.id for c in cands))
            if st.ring is None or ids != st.ring_ids:
                st.ring_ids, st.ring = ids, HashRing.build(ids, self.vnodes)
            target = pick_affinity(cands, st.ring, key, self.local)
        else:
            target = None
        if target is not None:
            self.local[target] = self.local.get(target, 0) + 1
        return target

    def plan(self, view: RegistryView, keys: Keys, model: str, key: Callable[[], str]) -> Route:
        """Route one request of ``model`` with the registry as last refreshed (no Redis call)."""
        strategy = self.strategy(view.control)
        self.on_refresh(view.refreshed_at)
        live = view.live_workers(model)
        shared = keys.stream(model)
        if any(w.model != model for w in live):  # a LoRA adapter: its workers read only its shared stream
            return Route("pull", None, Target(shared, "", shared), self.epoch)
        cands = [Candidate(w.id, w.slots, w.in_flight, w.queued, w.weight) for w in live]  # weight <= 0: slots
        target = self.route(strategy, model, cands, key() if strategy == "prefix_affinity" else "")
        if target is None:
            return Route(strategy, None, Target(shared, "", shared), self.epoch)
        return Route(strategy, target,
                     Target(keys.worker_stream(model, target), keys.worker_live(model, target), shared), self.epoch)

    def count(self, target: str | None) -> None:
        k = target or SHARED
        self.pushed[k] = self.pushed.get(k, 0) + 1

