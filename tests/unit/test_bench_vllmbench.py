"""bench.vllmbench's process pinning (``--pin``) on real processes: a serving tree whose engine processes
(named ``VLLM::*``, as vLLM names its engine core and model runner) go to CPU 0 and the rest to CPU 1; and the
burst's timeline (``--timeline``) read from the client's detailed result."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.report import tree_pids
from bench.vllmbench import ENGINE_CPU, REST_CPU, pin, timeline

two_cpus = pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")

# a parent that starts a child named like vLLM's model runner (it renames itself), then waits for its pipe to close
_TREE = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "open('/proc/self/comm', 'w').write('VLLM::Worker'); "
                          "print('ready', flush=True); import sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "ready\\n"
print(child.pid, flush=True)
sys.stdin.read()
child.stdin.close()
child.wait()
"""


@pytest.fixture
def tree() -> Iterator[tuple[int, int]]:
    p = subprocess.Popen([sys.executable, "-c", _TREE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdin is not None
    child = int(p.stdout.readline())
    try:
        yield p.pid, child
    finally:
        p.stdin.close()
        p.wait(10)


def _cpus(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


@two_cpus
def test_pin_puts_the_engine_processes_on_cpu_0_and_the_rest_on_cpu_1(tree: tuple[int, int]) -> None:
    parent, child = tree
    assert tree_pids([parent]) == {parent, child}
    assert Path(f"/proc/{child}/comm").read_text().strip() == "VLLM::Worker"
    moved = pin({"server": parent})
    assert moved["engine"] == len(os.listdir(f"/proc/{child}/task")) >= 1
    assert moved["rest"] == len(os.listdir(f"/proc/{parent}/task")) >= 1
    assert all(c == ENGINE_CPU for c in _cpus(child)) and all(c == REST_CPU for c in _cpus(parent))


@two_cpus
def test_pin_skips_a_process_that_is_gone() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(10)  # reaped: /proc has no entry for it
    assert pin({"gone": p.pid}) == {"engine": 0, "rest": 0}


def test_timeline_reads_the_burst_from_the_clients_detailed_result() -> None:
    # 3 requests, 2 slots: the third gets its first token only after the first one ended
    full = {"start_times": [100.0, 100.001, 100.002], "ttfts": [0.2, 0.3, 1.198], "latencies": [1.0, 1.5, 2.0]}
    t = timeline(full, slots=2)
    assert t["first_token_s"] == 0.2
    assert t["first_wave_ends_s"] == [1.0, 1.501]
    assert t["rest_first_tokens_s"] == [1.2, 1.2] and t["last_end_s"] == 2.002
    assert t["requests"]["sent_s"] == [0.0, 0.001, 0.002]
    assert timeline(full, slots=3)["rest_first_tokens_s"] is None
