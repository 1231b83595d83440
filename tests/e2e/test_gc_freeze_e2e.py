"""A serving process freezes its start-up heap (`gc.freeze`), unless `gc.freeze_after_start` is
off: full collections then scan only what came since, instead of holding the event loop for
tens of milliseconds every few seconds under load (issue 10, bench/load/stalls.py).

The server runs in a child process (`serve_until_signalled`, as `allocsvc serve` runs it): the
child reports what the collector holds once it serves, then stops itself with SIGTERM.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

CHILD = """
import asyncio, gc, json, logging, os, signal, sys
from allocsvc import server
from allocsvc.config import Settings

serving = asyncio.Event()

class Serving(logging.Handler):
    def emit(self, record):
        if record.getMessage() == "serving":
            serving.set()

async def main():
    logging.getLogger("allocsvc").addHandler(Serving())
    logging.getLogger("allocsvc").setLevel(logging.INFO)
    settings = Settings.model_validate(
        {"in_memory": True, "port": 0, "gc": {"freeze_after_start": sys.argv[1] == "on"}}
    )
    task = asyncio.create_task(server.serve_until_signalled(settings))
    await asyncio.wait_for(serving.wait(), 120)
    for _ in range(100):  # the freeze follows start(): a few loop turns at most
        if gc.get_freeze_count() or task.done():
            break
        await asyncio.sleep(0.01)
    print(json.dumps({"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))
    os.kill(os.getpid(), signal.SIGTERM)
    await task

asyncio.run(main())
"""


def _child(freeze: str) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, freeze], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_serving_freezes_the_start_up_heap() -> None:
    frozen = _child("on")
    kept = _child("off")
    # Start-up made tens of thousands of objects: frozen, the collector no longer tracks them.
    assert kept["frozen"] == 0
    assert frozen["frozen"] > 10_000
    assert frozen["tracked"] < kept["tracked"] // 10
