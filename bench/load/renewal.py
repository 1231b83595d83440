"""How long a full filter of evicted users takes to renew, and what it holds the event loop for
(issue 10), in one process with no gRPC around it.

    python bench/load/renewal.py [--users 1000000] [--held 100000] [--runs 3]

Each run, on an embedded PostgreSQL started here (a database of its own): `--users` new users of
a sticky experiment allocated through the batch path (1,000-item batches) with memory for
`--held` and a filter of evicted keys that is full after a few thousand evictions, flushed into
assignment blocks; then `renew_evicted_filter` (what the server's `renew-evicted-filter` job
calls) while a task yields to the loop again and again and records each gap between its wake-ups
(a gap is how long something else held the loop). Prints one JSON line per run: the renewal's
seconds, the blocks listed, the wake-ups, the longest gap, their 99th percentile and
how many were over 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import held  # bench/load/held.py
import run  # bench/load/run.py

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.service import AllocationService, Limits
from allocsvc.api import convert
from allocsvc.context import Extractor
from allocsvc.core import Engine
from allocsvc.store import PostgresStore
from allocsvc.store.migrations import migrate
from allocsvc.store.writebehind import PostgresJournal


async def _filled(journal: PostgresJournal, users: int, memory: int) -> AllocationService:
    """A service holding at most `memory` assignments whose filter of evicted users is full,
    every assignment flushed."""
    limits = Limits(max_held_assignments=memory, evicted_filter_keys=1)
    service = AllocationService(Engine(), journal, Extractor(), limits)
    experiment = pb.Experiment(
        id="e",
        status=pb.EXPERIMENT_STATUS_RUNNING,
        sticky=True,
        variants=[pb.Variant(id=v) for v in "ABCDE"],
    )
    await service.create_experiment(convert.experiment_from_pb(experiment))
    held.allocate(service, users)
    await journal.flush()
    assert service.held_statistics()["evicted_filter_full"] == 1
    return service


async def renewal(dsn: str, users: int, memory: int) -> dict[str, Any]:
    await migrate(dsn)
    async with await PostgresStore.connect(dsn, min_size=1, max_size=4) as store:
        journal = PostgresJournal(store, max_pending_assignments=users)
        service = await _filled(journal, users, memory)
        async with store.snapshot() as connection:
            blocks = await connection.fetchval("SELECT count(*) FROM assignment_blocks")
        gaps: list[float] = []
        renewing = True

        async def wake_ups() -> None:
            last = time.perf_counter()
            while renewing:
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        probe = asyncio.create_task(wake_ups())
        started = time.perf_counter()
        await service.renew_evicted_filter(journal)
        seconds = time.perf_counter() - started
        renewing = False
        await probe
        await journal.close()
    assert service.held_statistics()["evicted_filter_full"] == 0
    assert service.unlisted_experiments == 0
    gaps.sort()
    return {
        "users": users,
        "held": memory,
        "blocks": blocks,
        "renew_s": round(seconds, 3),
        "wake_ups": len(gaps),
        "max_gap_ms": round(gaps[-1] * 1e3, 2),
        "p99_gap_ms": round(gaps[int(len(gaps) * 0.99)] * 1e3, 3),
        "gaps_over_1ms": sum(g > 1e-3 for g in gaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--held", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="allocsvc-renewal-") as tmp,
        run.stores(Path(tmp)) as (postgres, _redis),
    ):
        for i in range(args.runs):
            dsn = run.database(postgres, f"renewal{i}")
            print(json.dumps(asyncio.run(renewal(dsn, args.users, args.held))), flush=True)


if __name__ == "__main__":
    main()
