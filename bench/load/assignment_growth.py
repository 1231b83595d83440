"""What a unary write-behind flush costs PostgreSQL as `assignments` grows (issue 10,
bench/RESULTS.md item 71). Every bench of the load harness starts on a fresh database; a
server that has run for an hour under load has millions of stored assignments, and the row
cost of the table's user index grows with them.

    python bench/load/assignment_growth.py [--sizes 0,1,3,6,10,20] [--seconds 20]
    python bench/load/assignment_growth.py --settings max_wal_size=8GB,checkpoint_timeout=15min

On a fresh embedded PostgreSQL (in a temporary directory, removed at the end; about 330 MB of
disk per million assignments): one experiment; at each size (millions of stored assignments,
each of a random user, added by INSERT ... SELECT), flushes as a durable unary server makes
them (`--rows` new assignments of random users every `--interval` seconds through
`PostgresStore.write_behind`, its binary COPY and counters), `--warmup` seconds and then
`--seconds` measured. Prints one JSON line per size: PostgreSQL's CPU (all its processes, from
/proc) per stored row and in cores, WAL bytes per row, checkpoints in the window, each
index's blocks read from outside shared buffers per row and its size, and each flush's
wall time (median, max). `--settings` are set with ALTER SYSTEM before the first size and the
server restarted. Bounded: one database on a unix socket, `--sizes` and `--seconds` fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import run  # bench/load/run.py: PostgreSQL's processes and their CPU

from allocsvc.store import PostgresStore
from allocsvc.store.embedded import EmbeddedPostgres
from allocsvc.store.migrations import migrate
from allocsvc.store.postgres import ExperimentRow, VariantRow, WriteBehind

GROW_CHUNK = 1_000_000
# The columns of a write-behind's COPY stream (`ASSIGNMENT_COPY_COLUMNS`), users at random.
_ROWS = (
    "SELECT $1 || to_hex(g), $2::bigint, 'user-' || (random() * 1e12)::bigint,"
    " (g % 5)::smallint, 'country:us|device:mobile'::text, 123::bigint, 2::smallint,"
    " 0.2::float8, {created} FROM generate_series($3::bigint, $4::bigint) AS g"
)
_GROW = (
    "INSERT INTO assignments (id, experiment_id, user_id, variant, segment_key, segment_hash,"
    " cascade_level, propensity, created_at) " + _ROWS.format(created="now() - interval '1 day'")
)
_INDEX_READS = (
    "SELECT indexrelname, idx_blks_read FROM pg_statio_user_indexes WHERE relname = 'assignments'"
)
_INDEX_SIZES = (
    "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes"
    " WHERE relname = 'assignments'"
)
_CHECKPOINTS = {  # PostgreSQL 17 moved them to pg_stat_checkpointer
    True: "SELECT num_timed + num_requested FROM pg_stat_checkpointer",
    False: "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter",
}
_WAL_SINCE = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8"


async def _streams(conn: Any, experiment: int, prefix: str, count: int, rows: int) -> list[bytes]:
    out = []
    query = _ROWS.format(created="now()")
    for k in range(count):
        buffer = io.BytesIO()
        first = k * rows + 1
        args = (f"{prefix}-", experiment, first, first + rows - 1)
        await conn.copy_from_query(query, *args, output=buffer, format="binary")
        out.append(buffer.getvalue())
    return out


async def _flush_paced(
    store: PostgresStore, streams: list[bytes], experiment: int, args: argparse.Namespace, tag: str
) -> list[float]:
    """Flush each stream `args.interval` after the last was due; each one's wall seconds."""
    counts = [(experiment, h, v, 9, 0, 0.0) for h in (1, 2, 3, 4) for v in range(5)]
    rows, interval = {experiment: args.rows}, args.interval
    walls = []
    start = time.perf_counter()
    for k, stream in enumerate(streams):
        delay = start + k * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        began = time.perf_counter()
        flush = WriteBehind(f"{tag}-{k}", stream, [], rows, counts)
        if not await store.write_behind(flush):
            raise RuntimeError(f"flush {tag}-{k} was already written")
        walls.append(time.perf_counter() - began)
    return walls


async def measure_size(
    dsn: str, postgres: EmbeddedPostgres, size: int, args: argparse.Namespace
) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    store = await PostgresStore.connect(dsn, min_size=1, max_size=2)
    try:
        experiment = await conn.fetchval("SELECT min(id) FROM experiments")
        stored = await conn.fetchval("SELECT count(*) FROM assignments")
        grow_began = time.perf_counter()
        while stored < size:
            n = min(GROW_CHUNK, size - stored)
            await conn.execute(_GROW, f"stored{size}-", experiment, stored + 1, stored + n)
            stored += n
        grown = time.perf_counter() - grow_began
        await conn.execute("VACUUM ANALYZE assignments")
        per_s = round(1 / args.interval)
        warm = await _streams(
            conn, experiment, f"warm{size}", round(args.warmup * per_s), args.rows
        )
        streams = await _streams(
            conn, experiment, f"new{size}", round(args.seconds * per_s), args.rows
        )
        await _flush_paced(store, warm, experiment, args, f"warm{size}")

        pg_pids = run.postgres_pids(postgres.data_dir)
        newer = await conn.fetchval("SELECT to_regclass('pg_stat_checkpointer') IS NOT NULL")
        checkpoints = await conn.fetchval(_CHECKPOINTS[newer])
        reads = dict(await conn.fetch(_INDEX_READS))
        lsn = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        cpu, began = run._cpu_seconds(pg_pids), time.perf_counter()
        walls = await _flush_paced(store, streams, experiment, args, f"new{size}")
        cpu, window = run._cpu_seconds(pg_pids) - cpu, time.perf_counter() - began
        # The statistics collector publishes a backend's counts when it goes idle.
        await asyncio.sleep(1.5)
        wal = await conn.fetchval(_WAL_SINCE, lsn)
        checkpoints = await conn.fetchval(_CHECKPOINTS[newer]) - checkpoints
        after = dict(await conn.fetch(_INDEX_READS))
        written = len(streams) * args.rows
        return {
            "stored_millions": round(stored / 1e6, 2),
            "grow_s": round(grown, 1),
            "index_mb": {
                name: round(nbytes / 2**20) for name, nbytes in await conn.fetch(_INDEX_SIZES)
            },
            "rows_per_flush": args.rows,
            "flushes_per_s": per_s,
            "window_s": round(window, 1),
            "pg_us_per_row": round(cpu / written * 1e6, 2),
            "pg_cores": round(cpu / window, 3),
            "wal_bytes_per_row": round(wal / written),
            "checkpoints": checkpoints,
            "index_blocks_read_per_row": {
                name: round((after[name] - reads.get(name, 0)) / written, 2) for name in after
            },
            "flush_ms_median": round(statistics.median(walls) * 1e3, 2),
            "flush_ms_max": round(max(walls) * 1e3, 1),
        }
    finally:
        await store.close()
        await conn.close()


async def prepare(dsn: str, settings: dict[str, str]) -> None:
    """Migrate, create the experiment, set `settings` (they take effect at the next start)."""
    await migrate(dsn)
    store = await PostgresStore.connect(dsn, min_size=1, max_size=1)
    try:
        variants = [VariantRow(i, f"v{i}") for i in range(5)]
        experiment = ExperimentRow(key="growth", name="growth", status="running", variants=variants)
        await store.insert_experiment(experiment)
    finally:
        await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        for name, value in settings.items():
            await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
    finally:
        await conn.close()


async def _shown(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        names = ("shared_buffers", "max_wal_size", "checkpoint_timeout", "wal_compression")
        return {name: await conn.fetchval(f"SHOW {name}") for name in names}
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="0,1,3,6,10,20", help="millions of stored rows")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured at each size")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--rows", type=int, default=900, help="assignments per flush")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between flushes")
    parser.add_argument("--settings", default="", help="name=value,... set with ALTER SYSTEM")
    args = parser.parse_args()
    sizes = [round(float(s) * 1e6) for s in args.sizes.split(",")]
    settings = dict(item.split("=", 1) for item in args.settings.split(",") if item)
    with tempfile.TemporaryDirectory(prefix="allocsvc-assignment-growth-") as tmp:
        postgres = EmbeddedPostgres(Path(tmp) / "postgres")
        asyncio.run(prepare(postgres.start(), settings))
        postgres.stop()  # and started again: some settings take a restart
        dsn = postgres.start()
        try:
            print(json.dumps({"settings": asyncio.run(_shown(dsn))}), flush=True)
            for size in sizes:
                print(json.dumps(asyncio.run(measure_size(dsn, postgres, size, args))), flush=True)
        finally:
            postgres.stop()


if __name__ == "__main__":
    main()
