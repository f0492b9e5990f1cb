"""A rolling update runs against the narrow fleet interface (ops/fleet.py), not against the supervisor:
ops/rolling.py imports nothing from ops/supervisor.py, and a fleet of stand-in processes is enough to
roll forward and to roll back."""

from __future__ import annotations

import ast
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import fakeredis

from common.keys import Keys
from common.settings import WorkerSettings
from ops.fleet import Child
from ops.rolling import RollingUpdate
from ops.rollout import RolloutOptions, RolloutState

ROOT = Path(__file__).resolve().parents[2]


def test_rolling_imports_nothing_from_the_supervisor() -> None:
    tree = ast.parse((ROOT / "ops" / "rolling.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "ops.supervisor" not in imported


class StandInFleet:
    """Workers that are ``sleep`` processes, 'ready' in the registry at once; one whose settings have
    ``slots`` 13 exits instead, before it registers."""

    def __init__(self, tmp: Path, n: int, template: WorkerSettings) -> None:
        self.keys = Keys("t")
        self.registry = fakeredis.FakeRedis()
        self.registry_refresh_s = 0.01
        self.tmp = tmp
        self.workers = [self.spawn_worker(i, template, worker_id=f"w{i}", gated=False) for i in range(n)]

    def slots(self) -> Sequence[Child]:
        return self.workers

    def assign(self, slot: int, child: Child) -> None:
        self.workers[slot] = child

    def spawn_worker(self, slot: int, template: WorkerSettings, *, worker_id: str, gated: bool) -> Child:
        fails = template.slots == 13
        code = "raise SystemExit(3)" if fails else "import time; time.sleep(30)"
        c = Child(f"slot{slot}", [sys.executable, "-c", code], {"MGPU_WORKER_ID": worker_id},
                  self.tmp / f"{worker_id}.log", held=True, template=template)
        c.start()
        if not fails:
            self.registry.hset(self.keys.worker(worker_id), "state", "ready")
        return c

    def surge_worker_id(self, slot: int) -> str:
        return f"w{slot}-s"


def _run(fleet: StandInFleet, source: WorkerSettings, target: WorkerSettings, **opts: object) -> RolloutState:
    st = RolloutState(id="ro-t", phase="running", options=RolloutOptions(canary=0, soak_s=0, **opts))
    ru = RollingUpdate(fleet, st, source, target)
    deadline = time.monotonic() + 20
    for _ in ru.steps():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert not ru.transient
    return st


def test_roll_forward_then_back(tmp_path: Path) -> None:
    base = WorkerSettings(engine="sim", model="m", slots=4, drain_grace_s=5)
    fleet = StandInFleet(tmp_path, 2, base)
    old = list(fleet.workers)
    try:
        st = _run(fleet, base, base.model_copy(update={"slots": 8}))
        assert st.phase == "done", st.reason
        assert [w.template.slots for w in fleet.workers if w.template] == [8, 8]
        assert all(w.running and not w.held for w in fleet.workers) and not any(w.running for w in old)
        st = _run(fleet, fleet.workers[0].template or base, base.model_copy(update={"slots": 13}), surge=True)
        assert st.phase == "rolled_back" and "exited with code 3" in st.reason
        assert [w.template.slots for w in fleet.workers if w.template] == [8, 8]  # surge: the old ones served on
    finally:
        for w in fleet.workers:
            w.signal(15)
