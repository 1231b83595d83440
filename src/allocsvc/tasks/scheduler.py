"""Runs periodic jobs on the event loop; a failing run is logged and the job goes on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

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

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # A job may swallow one cancellation (e.g. asyncio.wait_for in Python 3.11, when
            # its inner await finishes at that moment): ask again until the task has ended.
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
