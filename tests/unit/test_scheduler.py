"""Stopping the background scheduler ends every job, even one that swallowed a cancellation;
a job run once is tried again until it succeeds."""

from __future__ import annotations

import asyncio

import pytest

from allocsvc.tasks.scheduler import Scheduler

pytestmark = pytest.mark.unit


async def test_stop_ends_a_job_that_swallows_one_cancellation() -> None:
    swallowed: list[int] = []
    running = asyncio.Event()

    async def stubborn() -> None:
        try:
            running.set()
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if swallowed:
                raise
            # What asyncio.wait_for can do in Python 3.11 when its inner await finishes as
            # the cancellation arrives: the job returns, and the loop would run on.
            swallowed.append(1)

    scheduler = Scheduler()
    scheduler.every("stubborn", 0.001, stubborn)
    # Stopped once the job runs (a sleep could end first on a loop held up that long: the stop
    # would then cancel the wait before the job, which swallows nothing).
    await asyncio.wait_for(running.wait(), timeout=30)
    # Waited on, not cancelled from outside: a stop that hangs stays pending (30 s is only
    # the bound of a hang, a stop takes about a second here).
    stopping = asyncio.create_task(scheduler.stop())
    done, _ = await asyncio.wait({stopping}, timeout=30)
    try:
        assert stopping in done, "stop() did not end the job"
        assert swallowed == [1]
    finally:
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()


async def test_a_job_run_once_is_tried_again_until_it_succeeds() -> None:
    runs: list[int] = []
    done = asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise ConnectionError("not yet")
        done.set()

    scheduler = Scheduler()
    scheduler.once("flaky", flaky, retry=0.001)
    await asyncio.wait_for(done.wait(), timeout=30)
    await asyncio.sleep(0.05)  # a job that succeeded is not run again
    await scheduler.stop()
    assert len(runs) == 3
