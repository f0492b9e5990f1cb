"""The liveness thread's heartbeat pipeline, read back by name: what is queued, and how the replies
decode into a :class:`Beat` (fake pipelines: no Redis)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.settings import Settings
from gpu_worker.engine.sim import SimEngine
from gpu_worker.liveness import Beat, Keeper, LoopHooks, NamedPipeline
from gpu_worker.nvml import Gpu
from gpu_worker.registry import Registry
from gpu_worker.serving.sim import SimServer
from gpu_worker.stats import WorkerStats


class FakePipe:
    """Records queued commands; ``execute`` answers from ``replies`` (by command name, in order)."""

    def __init__(self, replies: dict[str, list[Any]] | None = None) -> None:
        self.command_stack: list[tuple[str, tuple[Any, ...]]] = []
        self.replies = {k: list(v) for k, v in (replies or {}).items()}

    def __getattr__(self, cmd: str) -> Any:
        def queue(*args: Any, **kw: Any) -> FakePipe:
            self.command_stack.append((cmd, args))
            return self
        return queue

    def __len__(self) -> int:  # as redis-py's pipelines (the plain and the cluster one): commands queued
        return len(self.command_stack)

    def execute(self) -> list[Any]:
        return [self.replies[cmd].pop(0) if self.replies.get(cmd) else True for cmd, _ in self.command_stack]


class FakeClient:
    def __init__(self, pipe: FakePipe) -> None:
        self.pipe = pipe
        self.deleted: list[str] = []

    def pipeline(self, transaction: bool = True) -> FakePipe:
        return self.pipe

    def delete(self, key: str) -> None:
        self.deleted.append(key)


def fake_renew(*, keys: list[str], args: list[Any], client: FakePipe) -> None:
    client.evalsha("renew", 1, *keys, *args)


def test_named_pipeline_reads_replies_by_name() -> None:
    pipe = FakePipe({"get": ["a", "b"], "xlen": [7]})
    p = NamedPipeline(pipe)
    pipe.set("k", 1)
    pipe.set("k2", 2)
    p.name(None)  # any number of unread replies
    pipe.get("x")
    p.name("x")
    pipe.xlen("s")
    p.name("length")
    pipe.get("y")
    p.name("y")
    pipe.delete("z")  # left unnamed: its reply is dropped
    assert p.execute() == {"x": "a", "length": 7, "y": "b"}


def test_a_name_stands_for_exactly_one_command() -> None:
    pipe = FakePipe()
    p = NamedPipeline(pipe)
    pipe.get("a")
    pipe.get("b")
    with pytest.raises(ValueError, match="2 commands"):
        p.name("both")
    with pytest.raises(ValueError, match="0 commands"):
        NamedPipeline(FakePipe()).name("nothing")


def test_beat_decodes_flags_length_and_lost_entries() -> None:
    leases = [("s:own", ["1-0"]), ("s:shared", ["2-0", "3-0"])]
    replies = {"drain": 1, "admit": 0, "own_length": 5, "renew s:own": [], "renew s:shared": [b"3-0"]}
    assert Beat.decode(replies, leases) == Beat(drain=True, admit=False, own_length=5, lost=[("s:shared", "3-0")])
    with pytest.raises(KeyError):  # a renewal the pipeline did not answer is an error, not "nothing lost"
        Beat.decode({"drain": 0, "admit": 0, "own_length": 0}, leases)


def _keeper(pipe: FakePipe) -> tuple[Keeper, WorkerStats, list[tuple[str, Any]]]:
    s = Settings.load({"engine": "sim", "model": "m", "worker_id": "w1", "namespace": "tl"}, env={})
    stats = WorkerStats()
    reg = Registry(None, s, worker_id="w1", server=SimServer(SimEngine(slots=4), "m"), stats=stats,  # type: ignore[arg-type]
                   gpu_name="", version="dev")
    calls: list[tuple[str, Any]] = []
    hooks = LoopHooks(drain=lambda: calls.append(("drain", None)), admit=lambda: calls.append(("admit", None)),
                      lost=lambda lost: calls.append(("lost", lost)),
                      unhealthy=lambda why: calls.append(("unhealthy", why)))

    class Loop:  # runs what the keeper schedules at once (the test has no second thread)
        def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
            fn(*args)

    k = Keeper(s, reg, stats, Gpu(None), leases=lambda: [], own_stream=s.keys.worker_stream("m", "w1"),
               hooks=hooks, loop=Loop())  # type: ignore[arg-type]
    return k, stats, calls


def test_keeper_beat_queues_presence_renewals_and_flags_then_acts() -> None:
    pipe = FakePipe({"exists": [1, 1], "xlen": [5], "scard": [1], "evalsha": [[], [b"9-0"]]})
    k, stats, calls = _keeper(pipe)
    own = k.own_stream
    leases = [(own, ["1-0"]), ("tl:q:m", ["9-0"])]
    client = FakeClient(pipe)
    beat = k.beat(client, fake_renew, leases)  # type: ignore[arg-type]
    cmds = [c for c, _ in pipe.command_stack]
    assert cmds == ["hset", "pexpire", "sadd", "sadd", "evalsha", "evalsha", "exists", "exists", "xlen", "scard"]
    assert beat == Beat(drain=True, admit=True, own_length=5, lost=[("tl:q:m", "9-0")], own_kept=1)
    k._act(client, beat, leases)  # type: ignore[arg-type]
    assert stats.own_queued == 3  # 5 in the own stream, one answered and kept for the lag, one running here
    assert calls == [("drain", None), ("admit", None), ("lost", [("tl:q:m", "9-0")])]
    assert client.deleted == [k._drain_key, k._admit_key]  # each flag is taken once


def test_the_loop_hooks_are_scheduled_never_called_in_the_thread() -> None:
    """With a real event loop the keeper only schedules: nothing runs until the loop does."""
    pipe = FakePipe({"exists": [1, 0], "xlen": [0]})
    k, _stats, calls = _keeper(pipe)
    loop = asyncio.new_event_loop()
    try:
        k.loop = loop
        client = FakeClient(pipe)
        k._act(client, k.beat(client, fake_renew, []), [])  # type: ignore[arg-type]
        assert calls == []
        loop.run_until_complete(asyncio.sleep(0))
        assert calls == [("drain", None)]
    finally:
        loop.close()
