"""Prometheus file-based service discovery (``file_sd_configs``) for mgpu workers.

Each worker publishes the port of its ``/metrics`` in its registry hash (``metrics_host``,
``metrics_port``).  :class:`TargetsWriter` turns the registry into a targets file and rewrites it
atomically when it changes.  A worker id that leaves the registry stays a target for ``keep_s``
seconds, so a crashed worker is scraped as down (``up == 0``, the WorkerDown alert) instead of
silently vanishing; a worker id that registers again replaces its old address.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from common.keys import Keys
from common.records import WorkerRecord


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_worker_addresses(r: redis.Redis, keys: Keys) -> dict[str, str]:
    """worker id -> "host:port" of its metrics server, for every registered worker that has one."""
    ids = sorted(_s(i) for i in r.smembers(keys.workers))
    if not ids:
        return {}
    p = r.pipeline(transaction=False)
    for wid in ids:
        p.hgetall(keys.worker(wid))
    out: dict[str, str] = {}
    for wid, raw in zip(ids, p.execute()):
        rec = WorkerRecord.from_hash(wid, raw)
        if rec is not None and rec.metrics_port:
            out[wid] = f"{rec.metrics_host or rec.host or '127.0.0.1'}:{rec.metrics_port}"
    return out


def write_json_atomic(path: Path, obj: Any) -> bool:
    """Write ``obj`` as JSON to ``path`` by rename; False (and no write) when the content is the same."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def static_targets(addresses: list[str], **labels: str) -> list[dict[str, Any]]:
    return [{"targets": sorted(addresses), "labels": dict(labels)}] if addresses else []


class TargetsWriter:
    def __init__(self, path: Path, keys: Keys, *, keep_s: float = 300.0) -> None:
        self.path = Path(path)
        self.keys = keys
        self.keep_s = keep_s
        self.seen: dict[str, tuple[str, float]] = {}  # worker id -> (address, last seen)

    def refresh(self, r: redis.Redis, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        for wid, addr in read_worker_addresses(r, self.keys).items():
            self.seen[wid] = (addr, now)
        self.seen = {w: (a, t) for w, (a, t) in self.seen.items() if now - t <= self.keep_s}
        addresses = sorted({a for a, _ in self.seen.values()})
        return write_json_atomic(self.path, static_targets(addresses, namespace=self.keys.ns))
