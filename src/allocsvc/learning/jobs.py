"""Training jobs in their own process, so training never holds the serving process's GIL.

A job is a function `target(payload, report) -> result` named as "module:function"; it runs in a
fresh ("spawn") process at lower CPU priority with one thread per math library, sends progress
through a pipe, and its result (or error text) comes back the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.connection import Connection
from typing import Any

# Environment of the training process: one thread per library, leaving cores to serving.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
NICE_INCREMENT = 10

Report = Callable[[int, int], None]


class JobFailed(Exception):
    """The training process raised, or died before answering."""


def _child(conn: Connection, target: str, payload: Any) -> None:
    with contextlib.suppress(OSError):
        os.nice(NICE_INCREMENT)
    for name in _THREAD_VARIABLES:
        os.environ[name] = "1"

    def report(done: int, total: int) -> None:
        conn.send(("progress", done, total))

    try:
        module, function = target.split(":")
        result = getattr(importlib.import_module(module), function)(payload, report)
        conn.send(("result", result))
    except BaseException as exc:  # the parent must hear about every failure
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _receive(conn: Connection) -> Any:
    try:
        return conn.recv()
    except EOFError:
        return ("error", "the training process exited without an answer")


async def run_in_process(target: str, payload: Any, on_progress: Report | None = None) -> Any:
    """Run `target(payload, report)` in a new process; cancelling this kills the process."""
    context = get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, target, payload), daemon=True)
    finished = False
    try:
        await asyncio.to_thread(process.start)
        sender.close()
        while True:
            message = await asyncio.to_thread(_receive, receiver)
            if message[0] == "progress":
                if on_progress is not None:
                    on_progress(message[1], message[2])
            elif message[0] == "result":
                finished = True
                return message[1]
            else:
                finished = True
                raise JobFailed(message[1])
    finally:
        if process.pid is not None:
            if not finished and process.is_alive():
                process.kill()  # cancelled: stop the work now
            await asyncio.to_thread(process.join, 10.0)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join)
        receiver.close()
