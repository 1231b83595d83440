"""How fast the embedded PostgreSQL takes assignment rows as the table grows (issue 10).

With PostgreSQL, `AllocateBatch` is bounded by how fast the write-behind's COPYs go in (the rest
is refused RESOURCE_EXHAUSTED). This COPYs `--chunks` x 200,000 assignment rows (random 16-hex
user ids, one transaction each, `synchronous_commit = off` as the write-behind) into a fresh,
migrated database, and prints rows/s per chunk, for the schema as migrated and for the same
schema changed by `--change` (SQL run after migrating; default: the user_id index migration 009
dropped, created again). Migration 010's comparison, its columns back in the default collation:

    python bench/load/ingest.py --rounds 4 --change 'ALTER TABLE assignments
        ALTER COLUMN id TYPE text COLLATE "default",
        ALTER COLUMN user_id TYPE text COLLATE "default"'

    python bench/load/ingest.py [--chunks 10] [--rounds 2] [--change "CREATE INDEX ..."]

Rows are built before each COPY is timed: the rates are PostgreSQL's (and asyncpg's encoding).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import run  # bench/load/run.py

from allocsvc.core import ASSIGNMENT_COPY_COLUMNS
from allocsvc.store.migrations import migrate

CHUNK = 200_000
USER_INDEX = "CREATE INDEX assignments_user_idx ON assignments (user_id)"


def _rows(first: int, prefix: str) -> list[tuple[Any, ...]]:
    """The write-behind's columns (`ASSIGNMENT_COPY_COLUMNS`)."""
    key = "device:iphone|source:instagram"
    made = datetime.now(UTC)
    return [
        (f"{prefix}-{k:x}", 1, secrets.token_hex(8), k % 5, key, 1234567, 0, 0.2, made)
        for k in range(first, first + CHUNK)
    ]


async def ingest(dsn: str, chunks: int, change: str | None) -> tuple[list[float], str]:
    """Rows/s of each chunk, and the table's size with its indexes at the end."""
    await migrate(dsn)
    connection = await asyncpg.connect(dsn)
    try:
        if change is not None:
            await connection.execute(change)
        prefix = secrets.token_hex(6)
        rates = []
        for chunk in range(chunks):
            rows = _rows(chunk * CHUNK, prefix)
            start = time.monotonic()
            async with connection.transaction():
                await connection.execute("SET LOCAL synchronous_commit = off")
                await connection.copy_records_to_table(
                    "assignments", records=rows, columns=ASSIGNMENT_COPY_COLUMNS
                )
            rates.append(CHUNK / (time.monotonic() - start))
        size = await connection.fetchval(
            "SELECT pg_size_pretty(pg_total_relation_size('assignments'))"
        )
        return rates, str(size)
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=10, help="COPYs of 200,000 rows each")
    parser.add_argument(
        "--change", "--index", default=USER_INDEX, help="SQL making the schema to compare with"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both, order alternated")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="allocsvc-ingest-") as tmp,
        run.stores(Path(tmp)) as (postgres, _redis),
    ):
        # A B B A ...: whichever goes second runs after the other's checkpoints and WAL.
        order = [("as migrated", None), ("changed", args.change)]
        for round_ in range(args.rounds):
            for name, change in order if round_ % 2 == 0 else order[::-1]:
                dsn = run.database(postgres, "ingest")
                rates, size = asyncio.run(ingest(dsn, args.chunks, change))
                each = " ".join(f"{r / 1000:.0f}k" for r in rates)
                mean = len(rates) * CHUNK / sum(CHUNK / r for r in rates)
                print(
                    f"{name}: rows/s per chunk {each}; all {mean:,.0f}; last {rates[-1]:,.0f};"
                    f" {size}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
