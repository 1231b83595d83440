"""What a lookup of one stored assignment costs while assignment blocks wait to be expanded
(issue 10, bench/RESULTS.md items 27 and 28): a sticky user's latest (`get_assignment`) or an
assignment by id that memory no longer holds, read out of the blocks whose filter may hold it,
against expanding one block (what such a lookup waited for in item 27) and every block (what
it waited for before blocks had filters).

    python bench/load/block_lookup.py [--blocks 20] [--rows 10000] [--lookups 50]

On a fresh embedded PostgreSQL: `--blocks` blocks of `--rows` assignments each (new users, one
experiment), written as the write-behind writes them; then `--lookups` lookups of users in no
block, a lookup of a user of every block and of an id of every block; then each block expanded
on its own (timed); then as many blocks again: those that may hold one user expanded (what an
export or erasure of that user does), then all the others at once (what it did before).
Prints one JSON line: milliseconds per lookup and per block expanded (median, max),
assignments the lookups expanded (none: they read blocks), and the seconds of expanding one
user's blocks and all the rest. Bounded: one database on
127.0.0.1, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import run  # bench/load/run.py

from allocsvc.core import assignment_block, filter_may_hold_user
from allocsvc.store import PostgresStore
from allocsvc.store.migrations import migrate
from allocsvc.store.postgres import AssignmentBlock, WriteBehind

HANDLE = 1


def _block(b: int, rows: int, prefix: str) -> list[Any]:
    """Held tuples of block `b`: a new user each."""
    now = int(time.time() * 1000)
    return [
        (f"{prefix}-{b * rows + k:x}", "e", HANDLE, f"u{b}-{k}", k % 5, "source:x", 1, 0.2, now)
        for k in range(rows)
    ]


async def _write_blocks(
    store: PostgresStore, blocks: int, rows: int
) -> tuple[list[list[Any]], list[bytes]]:
    """`blocks` blocks of `rows` new users each, written as the write-behind writes them: the
    assignments of each and its filter."""
    prefix = secrets.token_hex(6)
    written, filters = [], []
    for b in range(blocks):
        singles = _block(b, rows, prefix)
        block = AssignmentBlock(rows, *assignment_block([], singles))
        flush = WriteBehind(f"{prefix}-{b}", b"", [], {}, [], blocks=[block])
        assert await store.write_behind(flush)
        written.append(singles)
        filters.append(block.filter)
    return written, filters


async def _timed(lookups: list[Any]) -> list[float]:
    out = []
    for lookup in lookups:
        start = time.perf_counter()
        await lookup()
        out.append((time.perf_counter() - start) * 1000)
    return out


def _summary(ms: list[float], expanded: int) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(ms), 2),
        "max_ms": round(max(ms), 1),
        "assignments_expanded": expanded,
    }


async def measure(dsn: str, blocks: int, rows: int, lookups: int) -> dict[str, Any]:
    await migrate(dsn)
    store = await PostgresStore.connect(dsn)
    try:
        # The experiment of the blocks' rows (a server writes rows only of experiments stored
        # here; an export or erasure finds a user's assignments by experiment).
        await store.pool.execute(
            "INSERT INTO experiments (id, key) VALUES ($1, 'block-lookup')", HANDLE
        )
        written, filters = await _write_blocks(store, blocks, rows)
        out: dict[str, Any] = {"blocks": blocks, "rows_per_block": rows}
        before = await store.unexpanded_assignments()
        absent = [f"new-{i}" for i in range(lookups)]
        ms = await _timed([lambda u=u: store.get_assignment(HANDLE, u) for u in absent])
        left = await store.unexpanded_assignments()
        out["user_in_no_block"] = _summary(ms, before - left)
        passed = sum(filter_may_hold_user(f, HANDLE, u) for f in filters for u in absent)
        out["user_in_no_block"]["filter_passes"] = passed
        # A user and an id of each block (read out of it, not expanded).
        users = [written[b][7][3] for b in range(blocks)]
        ms = await _timed([lambda u=u: store.get_assignment(HANDLE, u) for u in users])
        out["user_in_a_block"] = _summary(ms, left - (left := await store.unexpanded_assignments()))
        ids = [written[b][11][0] for b in range(blocks)]
        ms = await _timed([lambda i=i: store.get_assignment_by_id(i) for i in ids])
        out["id_in_a_block"] = _summary(ms, left - (left := await store.unexpanded_assignments()))
        # What a lookup of a user in a block waited for in item 27: that block's expansion.
        block_ids = [r["id"] for r in await store.pool.fetch("SELECT id FROM assignment_blocks")]
        ms = await _timed(
            [lambda b=b: store.expand_blocks(wait=True, only=[b]) for b in sorted(block_ids)]
        )
        out["one_block_expanded"] = _summary(ms, left)
        # What every such lookup waited for before: as many blocks again, all expanded. First
        # an export's or erasure's of one user of one of them: the blocks its filter may hold.
        again, _ = await _write_blocks(store, blocks, rows)
        start = time.perf_counter()
        out["one_user_expanded"] = await store.expand_blocks_of_user(again[blocks // 2][7][3])
        out["one_user_seconds"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        out["all_expanded"] = await store.expand_all_blocks()
        out["all_seconds"] = round(time.perf_counter() - start, 2)
        return out
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=50)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="allocsvc-block-lookup-") as tmp,
        run.stores(Path(tmp)) as (postgres, _redis_url),
    ):
        dsn = run.database(postgres, "block_lookup")
        result = asyncio.run(measure(dsn, args.blocks, args.rows, args.lookups))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
