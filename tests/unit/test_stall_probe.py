"""bench/load/stalls.py's probes: a job's steps on the event loop, the loop watcher, and the
attribution of each stall to the work that overlapped it (issue 10's tail latency)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "load"))

import stalls  # bench/load/stalls.py

pytestmark = pytest.mark.unit


async def test_a_job_is_recorded_step_by_step() -> None:
    steps: list[tuple[float, float, float]] = []
    awaited: list[float] = []

    async def job() -> None:
        time.sleep(0.03)  # holds the loop: the first step
        awaited.append(time.perf_counter())
        await asyncio.sleep(0.03)  # waits: between steps, not in one
        sum(range(1000))  # the second step, short

    await stalls._Stepped(job(), lambda s, e, c: steps.append((s, e, c)))
    # asyncio.sleep yields once: two steps, the first as long as the blocking sleep at least.
    assert len(steps) == 2
    (s1, e1, c1), (s2, _, _) = steps
    assert e1 - s1 >= 0.03
    assert c1 < e1 - s1  # sleeping is not CPU time
    # The await between the steps is in neither: the first ends after the await began, the
    # second begins once it is over (its timer started after `awaited`; the first step's end
    # is recorded later still, so `s2 - e1` alone may fall short of 0.03).
    assert s1 <= awaited[0] <= e1 <= s2
    assert s2 - awaited[0] >= 0.03


async def test_a_blocking_job_shows_as_a_stall_it_caused() -> None:
    probes = stalls.Probes(stall_s=0.01)
    watcher = asyncio.create_task(probes.watch_loop())
    try:
        await asyncio.sleep(0.05)  # the watcher runs
        probes.recording = True

        async def blocking() -> None:
            time.sleep(0.1)

        await probes.timed("job blocking", blocking)()
        await asyncio.sleep(0.05)  # the watcher wakes, late
        probes.recording = False
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
    summary = stalls.summarize(probes, window=1.0)
    assert summary["stalls"]["job blocking"]["count"] == 1
    assert summary["stalls"]["job blocking"]["max_ms"] >= 90
    assert summary["work"]["job blocking"]["steps"] == 1


def test_stalls_are_attributed_to_overlapping_work() -> None:
    probes = stalls.Probes(stall_s=0.002)
    probes.work = [
        stalls.Interval("gc gen 2", 1.000, 1.050, cpu=0.05),
        stalls.Interval("write-behind flush", 2.000, 2.004, cpu=0.004),
        stalls.Interval("write-behind flush", 3.000, 3.001, cpu=0.001),
    ]
    probes.stalls = [
        stalls.Interval("stall", 1.010, 1.055),  # the collection
        stalls.Interval("stall", 2.001, 2.006),  # the first flush
        stalls.Interval("stall", 4.000, 4.003, on_cpu=0.001, runnable=0.003),  # nothing ran
    ]
    summary = stalls.summarize(probes, window=10.0)
    assert summary["stalls"] == {
        "gc gen 2": {"count": 1, "total_ms": 45.0, "max_ms": 45.0},
        "write-behind flush": {"count": 1, "total_ms": 5.0, "max_ms": 5.0},
        "unexplained": {"count": 1, "total_ms": 3.0, "max_ms": 3.0},
    }
    # The unexplained stall (3 ms late, over a 1 ms sleep): on a CPU 1 ms, waiting for one
    # 3 ms, so blocked beyond the sleep for none.
    assert summary["unexplained_stalls_loop_thread_ms"] == {
        "on CPU": 1.0,
        "runnable, waiting for a CPU": 3.0,
        "blocked (GIL, blocking call)": 0.0,
    }
    flush = summary["work"]["write-behind flush"]
    assert (flush["steps"], flush["total_ms"], flush["max_ms"], flush["cpu_max_ms"]) == (
        2,
        5.0,
        4.0,
        4.0,
    )
