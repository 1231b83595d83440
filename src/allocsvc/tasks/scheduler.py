"""Runs periodic jobs (and jobs run until done) on the event loop; a failing run is logged
and the job goes on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def every(self, name: str, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` every `seconds` (after each run ends); 0 or less disables it."""
        if seconds > 0:
            self._tasks.append(asyncio.create_task(self._loop(name, seconds, job), name=name))

    async def _loop(self, name: str, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                log.exception("background job failed", extra={"job": name})

    def once(self, name: str, job: Callable[[], Awaitable[None]], *, retry: float) -> None:
        """Run `job` now, and again `retry` seconds after each run that fails, until one
        succeeds."""
        self._tasks.append(asyncio.create_task(self._until_done(name, retry, job), name=name))

    async def _until_done(
        self, name: str, retry: float, job: Callable[[], Awaitable[None]]
    ) -> None:
        while True:
            try:
                await job()
                return
            except Exception:
                log.exception("background job failed", extra={"job": name})
            await asyncio.sleep(retry)

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks.clear()


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], *, every: float = 1.0) -> None:
    """Cancel the tasks and wait until each has ended. A task may swallow a cancellation
    (asyncio.wait_for in Python 3.11 when its inner await finishes at that moment; a loop that
    catches a library's errors, when the library lets one of them out in its place, as the
    Redis sync loop once did inside a redis-py call): it is cancelled again every `every`
    seconds until it has ended."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        while not task.done():
            await asyncio.wait({task}, timeout=every)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
