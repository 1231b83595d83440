"""Batches of a sticky experiment's new users on replicas sharing state through Redis (issue
10): this tree, and with `--base` an earlier commit beside it, in one run.

    python bench/load/sticky_batches.py [--base REV] [--rounds 3] [--seconds 10] [--in-flight 2]
        [--held N]

Each setup is `allocsvc serve` on its own database of one embedded PostgreSQL, sharing state
through its own database of one redis-server (ab.py's `--redis` setups; the base built as ab.py
builds it). h2load repeats one body, so after its first call every user of a sticky experiment
is known and answered from memory; here a Python gRPC client sends `AllocateBatch` calls of
1,000 items for run.py's sticky experiment, each item a user never seen (the ids written into
one serialized item), `--in-flight` calls at a time for `--seconds`, the setups in turn, the
order rotated each round. Per run: allocations/s answered, and server CPU and main-thread CPU
per call (the process tree's /proc counters; Redis's and PostgreSQL's own CPU not included).
`--held` sets the servers' `max_held_assignments` (0: no bound): past it, the held store evicts
users, and a batch's users whose keys pass its filter of evicted ones are looked up in
PostgreSQL (one call per batch).
Bounded: rounds x setups runs of `--seconds`, after a short warm-up, all on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from typing import Any

import ab  # bench/load/ab.py
import benchkit  # bench/load/benchkit.py
import grpc
import h2  # bench/load/h2.py
import run  # bench/load/run.py

from allocsvc._proto import allocsvc_pb2 as pb

ITEMS = 1_000
WARMUP_S = 3.0
METHOD = "/allocsvc.v1.Allocator/AllocateBatch"
# User ids of one width, written into the serialized item: "s<setup><run>-<n>", 16 characters.
ID_WIDTH = 16


class Batches:
    """Serialized AllocateBatch requests, each of ITEMS users not sent before."""

    def __init__(self, tag: str) -> None:
        placeholder = "#" * ID_WIDTH
        item = pb.AllocateBatchRequest(
            requests=[
                pb.AllocateRequest(
                    experiment_id=run.EXPERIMENT, user_id=placeholder, context=benchkit.CONTEXT
                )
            ]
        ).SerializeToString()
        self._head, self._tail = item.split(placeholder.encode())
        self._tag = tag
        self._next = itertools.count()

    def next(self) -> bytes:
        head, tail, tag = self._head, self._tail, self._tag
        start = next(self._next) * ITEMS
        width = ID_WIDTH - len(tag) - 1
        return b"".join(
            head + f"{tag}-{n:0{width}d}".encode() + tail for n in range(start, start + ITEMS)
        )


async def _load(target: str, batches: Batches, seconds: float, in_flight: int) -> dict[str, int]:
    """Calls `in_flight` at a time for `seconds`: answered items and calls, and failed calls."""
    counts = {"allocations": 0, "calls": 0, "failed": 0}
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    raw = await call(batches.next(), timeout=60)
                except grpc.aio.AioRpcError:
                    counts["failed"] += 1
                    continue
                results = pb.AllocateBatchResponse.FromString(raw).results
                counts["allocations"] += sum(r.HasField("allocation") for r in results)
                counts["calls"] += 1

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return counts


def measure(target: h2.Target, batches: Batches, seconds: float, in_flight: int) -> dict[str, Any]:
    pids = target.setup.pids()
    cpu0, loop0 = run._cpu_seconds(pids), run._main_thread_cpu_seconds(pids)
    began = time.monotonic()
    counts = asyncio.run(_load(target.setup.target, batches, seconds, in_flight))
    wall = time.monotonic() - began
    cpu = run._cpu_seconds(pids) - cpu0
    loop = run._main_thread_cpu_seconds(pids) - loop0
    calls = max(counts["calls"], 1)
    return {
        "allocations_per_s": round(counts["allocations"] / wall),
        "server_ms_per_call": round(cpu / calls * 1000, 2),
        "main_thread_ms_per_call": round(loop / calls * 1000, 2),
        "server_cores": round(cpu / wall, 2),
        "failed_calls": counts["failed"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--base", help="an earlier commit to measure beside this tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--in-flight", type=int, default=2, help="calls in flight at a time")
    parser.add_argument("--held", type=int, help="the servers' max_held_assignments (0: no bound)")
    args = parser.parse_args()
    if args.held is not None:
        os.environ["ALLOCSVC_MAX_HELD_ASSIGNMENTS"] = str(args.held)
    setups = ["this", "base"] if args.base else ["this"]
    rows = []
    with ab.stores_and_base("allocsvc-sticky-", args.base, parser) as stores:
        workdir, postgres, redis, base = stores
        base_src = base or workdir
        targets: dict[str, h2.Target] = {}
        try:
            for name in setups:
                targets[name] = ab.start(name, workdir, base_src, postgres, redis)
            batches = {name: Batches(f"s{i}") for i, name in enumerate(setups)}
            for name in setups:
                measure(targets[name], batches[name], WARMUP_S, args.in_flight)
            for k in range(args.rounds):
                for name in h2.rotated(setups, k):
                    row = measure(targets[name], batches[name], args.seconds, args.in_flight)
                    rows.append({"round": k + 1, "setup": name, **row})
                    print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            for target in targets.values():
                target.setup.stop()
    for name in setups:
        mine = [r for r in rows if r["setup"] == name]
        rates = sorted(r["allocations_per_s"] for r in mine)
        print(
            json.dumps(
                {
                    "setup": name,
                    "median_allocations_per_s": rates[len(rates) // 2],
                    "runs": mine,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
