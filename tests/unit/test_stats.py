"""The worker's stats record, and what its readers make of it: the registry record, ``/health`` and
the state metrics."""

from __future__ import annotations

import time

from prometheus_client import generate_latest

from common.records import WorkerRecord, WorkerState
from common.settings import Settings
from gpu_worker.engine.sim import SimEngine
from gpu_worker.metrics import WorkerMetrics
from gpu_worker.nvml import Gpu
from gpu_worker.registry import Registry
from gpu_worker.serving.sim import SimServer
from gpu_worker.stats import WorkerStats


def _settings(**kw: object) -> Settings:
    return Settings.load({"engine": "sim", "model": "m", "worker_id": "w1", "slots": 4, **kw}, env={})


def test_slots_are_counted_as_jobs_start_and_end() -> None:
    st = WorkerStats()
    assert (st.state, st.healthy, st.requests, st.busy_slots) == (WorkerState.STARTING, True, 0, 0)
    assert st.free_slots(4) == 4
    st.job_started(1)
    st.job_started(3)  # a request with n=3 takes three slots
    assert (st.requests, st.busy_slots, st.free_slots(4)) == (2, 4, 0)
    st.job_started(2)  # reclaimed past the engine's slots: free slots never go below zero
    assert st.free_slots(4) == 0
    st.job_ended(2)
    st.job_ended(3)
    assert (st.requests, st.busy_slots, st.free_slots(4)) == (1, 1, 3)


def test_loop_lag_counts_from_the_last_tick() -> None:
    st = WorkerStats()
    assert 0.0 <= st.loop_lag_s < 1.0
    st.loop_tick = time.monotonic() - 5.0
    assert 4.9 < st.loop_lag_s < 6.0
    st.loop_tick = time.monotonic() + 5.0
    assert st.loop_lag_s == 0.0  # never negative


def test_registry_record_reads_the_stats() -> None:
    s = _settings(weight=2.5)
    st = WorkerStats(state=WorkerState.READY, served=7, failed=1, reclaimed=2, fenced=3, dead_lettered=4,
                     cancelled=5, skipped=6, own_queued=9)
    st.job_started(3)
    engine = SimEngine(slots=4, max_model_len=256)
    engine.aborts = 11
    reg = Registry(None, s, worker_id="w1", server=SimServer(engine, "m"), stats=st, gpu_name="",  # type: ignore[arg-type]
                   version="v9")
    reg.metrics_port = 9100
    back = WorkerRecord.from_hash("w1", reg.record().to_hash())
    assert back is not None
    assert (back.state, back.in_flight, back.slots, back.queued, back.weight) == ("ready", 3, 4, 9, 2.5)
    assert (back.served, back.failed, back.reclaimed, back.fenced, back.dead_lettered, back.cancelled,
            back.skipped, back.engine_aborts) == (7, 1, 2, 3, 4, 5, 6, 11)
    assert (back.model, back.engine, back.version, back.metrics_port, back.max_model_len) == ("m", "sim", "v9",
                                                                                              9100, 256)
    assert back.names == ["m"]  # a ready worker lists what it answers to
    assert abs(back.heartbeat - time.time()) < 5


def test_health_and_state_metrics_read_the_stats() -> None:
    s = _settings()
    st = WorkerStats(state=WorkerState.READY, served=3)
    st.job_started(2)
    m = WorkerMetrics(s, st, SimServer(SimEngine(slots=4), "m"), Gpu(None), worker_id="w1", version="dev")
    code, body = m.health()
    assert code == 200 and (body["state"], body["in_flight"], body["busy_slots"], body["slots"], body["served"]) \
        == ("ready", 1, 2, 4, 3)
    text = generate_latest(m.registry).decode()
    assert 'mgpu_worker_busy_slots{gpu="none",model="m",worker="w1"} 2.0' in text
    assert 'mgpu_worker_state{gpu="none",model="m",state="ready",worker="w1"} 1.0' in text
    st.loop_tick = time.monotonic() - s.loop_stall_s - 1  # a stalled loop
    assert m.health()[0] == 503
    st.loop_tick = time.monotonic()
    st.healthy = False
    assert m.health()[0] == 503
    st.healthy, st.state = True, WorkerState.GONE
    assert m.health()[0] == 503
