"""What a held assignment costs in memory, and how fast the write-behind writes batches'
assignments to PostgreSQL (issue 10), in one process with no gRPC around it.

    python bench/load/held.py [--held 1000000] [--rows 200000]

1. Memory: `--held` assignments made through the batch path (1,000-item batches, 14-character
   user ids, a non-sticky 5-variant experiment segmented by source and device, the in-memory
   journal, no bound on the held store): VmRSS before and after, per assignment.
2. PostgreSQL: `--rows` assignments made the same way with the PostgreSQL journal (on an
   embedded PostgreSQL started here), then one write-behind flush of all of them: rows per
   second of wall time, and this process's CPU time for it (the flush's binary COPY stream is
   written in Rust; PostgreSQL's own CPU is not counted).
3. Restart: a new service restores from those rows (`allocsvc.server.restore`, as a server
   starts) with memory for a quarter of them (`--restart-held`), then with no bound: rows
   read, wall seconds and the RSS they added; bounded, also the seconds to list every stored
   user into the filter of evicted keys (a server does that in the background after start).
   The flush wrote the rows as assignment blocks (10,000 or more), so these restarts read
   them out of the blocks; then the blocks are expanded into the table (`expand_s`: what a
   restart waited for before it read blocks) and an unbounded restart reads the rows
   (`restart_rows_*`).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import benchkit  # bench/load/benchkit.py
import run  # bench/load/run.py

from allocsvc import server
from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import Journal, MemoryJournal
from allocsvc.allocation.service import AllocationService, Limits
from allocsvc.api import convert
from allocsvc.context import Extractor
from allocsvc.core import Engine
from allocsvc.store import PostgresStore
from allocsvc.store.migrations import migrate
from allocsvc.store.writebehind import PostgresJournal


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _service(journal: Journal) -> AllocationService:
    service = AllocationService(Engine(), journal, Extractor())
    experiment = pb.Experiment(
        id="e",
        status=pb.EXPERIMENT_STATUS_RUNNING,
        variants=[pb.Variant(id=v) for v in "ABCDE"],
        segmentation=benchkit.manual_segmentation(),
    )
    await service.create_experiment(convert.experiment_from_pb(experiment))
    return service


def allocate(service: AllocationService, n: int) -> float:
    """Allocate `n` new users of experiment "e" in 1,000-item batches; seconds of CPU per
    item."""
    start = time.process_time()
    for b in range(n // 1000):
        request = pb.AllocateBatchRequest(
            requests=[
                pb.AllocateRequest(
                    experiment_id="e", user_id=f"user-{b:04d}-{i:04d}", context=benchkit.CONTEXT
                )
                for i in range(1000)
            ]
        ).SerializeToString()
        prepared = service.prepare_batch(request)
        assert prepared is not None
        service.finish_batch(prepared, "", {}, {})
    return (time.process_time() - start) / n


async def memory(held: int) -> dict[str, Any]:
    service = await _service(MemoryJournal())
    gc.collect()
    before = _rss_kib()
    allocate(service, held)
    gc.collect()
    after = _rss_kib()
    return {
        "held": held,
        "rss_kib_added": after - before,
        "bytes_per_held": (after - before) * 1024 / held,
    }


async def flush(dsn: str, rows: int, restart_held: int) -> dict[str, Any]:
    await migrate(dsn)
    async with await PostgresStore.connect(dsn, min_size=1, max_size=4) as store:
        journal = PostgresJournal(store, max_pending_assignments=rows)
        service = await _service(journal)
        allocate(service, rows)
        wall, cpu = time.perf_counter(), time.process_time()
        await journal.flush()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert journal.stats.assignments_written == rows, journal.stats
        out: dict[str, Any] = {
            "rows": rows,
            "flush_s": wall,
            "rows_per_s": rows / wall,
            "flush_cpu_s": cpu,
        }
        del service, journal
        for name, held in (("restart_bounded", restart_held), ("restart_unbounded", 0)):
            out.update({f"{name}_{k}": v for k, v in (await restart(store, held)).items()})
        expanding = time.perf_counter()
        out["expanded"] = await store.expand_all_blocks()
        out["expand_s"] = time.perf_counter() - expanding
        out.update({f"restart_rows_{k}": v for k, v in (await restart(store, 0)).items()})
    return out


async def restart(store: PostgresStore, held: int) -> dict[str, Any]:
    """Restore a new service from the store as a server starts, holding at most `held`."""
    gc.collect()
    before = _rss_kib()
    journal = PostgresJournal(store)
    service = AllocationService(Engine(), journal, Extractor(), Limits(max_held_assignments=held))
    wall = time.perf_counter()
    loaded = await server.restore(journal, service)
    wall = time.perf_counter() - wall
    gc.collect()
    out = {
        "held_cap": held,
        "rows_read": loaded["assignments"],
        "block_rows_read": loaded["block_assignments"],
        "s": wall,
        "rss_kib_added": _rss_kib() - before,
    }
    if loaded["unread"]:
        # What the server then does in the background: every stored user into the filter.
        listing = time.perf_counter()
        await service.list_stored_users(journal.list_users)
        out["list_s"] = time.perf_counter() - listing
        out["rss_kib_added_listed"] = _rss_kib() - before
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--held", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--restart-held", type=int, help="default: a quarter of --rows")
    args = parser.parse_args()
    out = asyncio.run(memory(args.held))
    with (
        tempfile.TemporaryDirectory(prefix="allocsvc-held-") as tmp,
        run.stores(Path(tmp)) as (
            postgres,
            _redis,
        ),
    ):
        restart_held = args.restart_held or max(1, args.rows // 4)
        out.update(asyncio.run(flush(run.database(postgres, "held"), args.rows, restart_held)))
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
