"""PostgreSQL storage over an asyncpg pool.

Plain rows in, plain rows out: no allocation policy lives here. Every statement is parameterised;
batches go through `unnest` of typed arrays in one statement. Segment hashes are unsigned 64-bit
integers in Python and signed BIGINTs in Postgres (`to_signed64` / `to_unsigned64`). Counters are
only ever incremented, so concurrent writers (replicas, the write-behind flusher, conversions)
never lose each other's updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from allocsvc.core import (
    ASSIGNMENT_COPY_COLUMNS,
    RESTORE_COPY_COLUMNS,
    block_rows_of_ids,
    block_rows_of_users,
    decompress_block,
    filters_may_hold_ids,
    filters_may_hold_users,
)

if TYPE_CHECKING:
    from allocsvc._core import BlockRow

__all__ = [
    "AssignmentBlock",
    "AssignmentRow",
    "ConflictError",
    "ConversionRow",
    "CountRow",
    "ExperimentRow",
    "NotFoundError",
    "PostgresStore",
    "SegmentRow",
    "SegmentationConfigRow",
    "StoreError",
    "TrafficRow",
    "VariantRow",
    "WriteBehind",
    "datetime_of_ms",
    "to_signed64",
    "to_unsigned64",
]

_U64 = 1 << 64
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1

# (experiment id, segment hash as unsigned 64-bit, variant, allocations, conversions, value sum)
CountRow = tuple[int, int, int, int, int, float]

_T = TypeVar("_T")
_DEADLOCK_RETRIES = 3
# asyncpg's Pool.close waits, without bound, for every connection to be released.
POOL_CLOSE_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


def to_signed64(value: int) -> int:
    """The BIGINT that stores an unsigned 64-bit hash (two's complement)."""
    if not 0 <= value < _U64:
        raise ValueError(f"not an unsigned 64-bit integer: {value}")
    return value - _U64 if value > _I64_MAX else value


def to_unsigned64(value: int) -> int:
    """The unsigned 64-bit hash stored in a BIGINT."""
    if not _I64_MIN <= value <= _I64_MAX:
        raise ValueError(f"not a signed 64-bit integer: {value}")
    return value + _U64 if value < 0 else value


class StoreError(Exception):
    """A storage operation failed for a reason the caller can act on."""


class ConflictError(StoreError):
    """A unique key (experiment key, variant key or index) is already taken."""


class NotFoundError(StoreError):
    """The row to change does not exist."""


@dataclass(frozen=True, slots=True)
class VariantRow:
    index: int
    key: str
    name: str = ""
    weight: float | None = None
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExperimentRow:
    """An experiment as stored. `id` and the timestamps are set by the database."""

    key: str
    name: str = ""
    description: str = ""
    status: str = "draft"
    policy: str = "thompson"
    config: dict[str, Any] = field(default_factory=dict)
    sticky: bool = True
    variants: list[VariantRow] = field(default_factory=list)
    id: int | None = None
    propensity_floor: float = 0.0
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SegmentationConfigRow:
    experiment_id: int
    mode: str = "disabled"
    segment_by: list[str] = field(default_factory=list)
    min_samples_per_segment: int = 100
    auto_activation: bool = False
    auto_activation_threshold: int = 1000
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class AssignmentBlock:
    """Assignments as one row of `assignment_blocks` (see `PostgresStore.expand_blocks`)."""

    rows: int
    payload: bytes  # compressed, as `assignment_block` builds it (see `decompress_block`)
    filter: bytes  # the filter `assignment_block` builds with it


@dataclass(frozen=True, slots=True)
class WriteBehind:
    """One flush of the write-behind (see `PostgresStore.write_behind`); `token` names it
    across retries."""

    token: str
    copy_rows: bytes  # the assignments, a binary COPY stream
    segments: Sequence[SegmentRow]
    visitors: Mapping[int, int]  # new assignments per experiment (today's traffic)
    counts: Sequence[CountRow]
    # The assignments as blocks instead (then `copy_rows` is empty)
    blocks: Sequence[AssignmentBlock] = ()


@dataclass(frozen=True, slots=True)
class AssignmentRow:
    """A sticky assignment. `segment_key` is the full canonical key of the request."""

    id: str
    experiment_id: int
    user_id: str
    variant: int
    segment_key: str
    segment_hash: int  # unsigned 64-bit
    cascade_level: int = 0
    propensity: float | None = None
    context: dict[str, Any] = field(default_factory=dict)
    region: str | None = None
    created_at: datetime | None = None  # None: the database's now()


@dataclass(frozen=True, slots=True)
class ConversionRow:
    """A conversion, with the hashes of every level of its assignment's cascade path."""

    assignment_id: str
    experiment_id: int
    variant: int
    path_hashes: Sequence[int]  # unsigned 64-bit, global first
    value: float = 0.0
    idempotency_key: str = ""  # empty: one conversion per assignment
    segment_key: str = ""
    user_id: str | None = None
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SegmentRow:
    experiment_id: int
    segment_hash: int  # unsigned 64-bit
    segment_key: str
    level: int
    parent_hash: int | None  # unsigned 64-bit; None for the global segment
    dimensions: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HierarchyRow:
    """One node of a built segment tree (hashes unsigned 64-bit)."""

    node_hash: int
    parent_hash: int | None
    level: int
    segment_key: str
    allocations: int
    conversions: int
    value_sum: float
    stats: dict[str, Any]
    pruned: bool


@dataclass(frozen=True, slots=True)
class RecommendationRow:
    id: int
    experiment_id: int
    kind: str
    payload: dict[str, Any]
    status: str
    created_at: datetime
    decided_at: datetime | None = None
    decided_by: str | None = None


@dataclass(frozen=True, slots=True)
class TrafficRow:
    experiment_id: int
    day: date
    visitors: int
    allocations: int
    conversions: int


# Counter deltas, summed per key, rows locked in key order (`sql/015_shared_counter_upserts.sql`).
_UPSERT_COUNTS = """
SELECT add_counts($1::bigint[], $2::bigint[], $3::smallint[], $4::bigint[], $5::bigint[],
                  $6::float8[])
"""

_INSERT_VARIANTS = """
INSERT INTO variants (experiment_id, index, key, name, weight, payload)
SELECT $1, v.index, v.key, v.name, v.weight, v.payload::jsonb
FROM unnest($2::smallint[], $3::text[], $4::text[], $5::float8[], $6::text[])
     AS v(index, key, name, weight, payload)
"""

_INSERT_ASSIGNMENTS = """
INSERT INTO assignments (id, experiment_id, user_id, variant, segment_key, segment_hash,
                         cascade_level, propensity, context, region, created_at)
SELECT a.id, a.experiment_id, a.user_id, a.variant, a.segment_key, a.segment_hash,
       a.cascade_level, a.propensity, a.context::jsonb, a.region, COALESCE(a.created_at, now())
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::smallint[], $5::text[], $6::bigint[],
            $7::smallint[], $8::float8[], $9::text[], $10::text[], $11::timestamptz[])
     AS a(id, experiment_id, user_id, variant, segment_key, segment_hash, cascade_level,
          propensity, context, region, created_at)
ON CONFLICT DO NOTHING
"""

_CLAIM_FLUSH = """
WITH old AS (
    DELETE FROM write_behind_flushes WHERE flushed_at < now() - interval '1 day'
)
INSERT INTO write_behind_flushes (token) VALUES ($1) ON CONFLICT DO NOTHING RETURNING token
"""

# A day's traffic of several experiments, one row each (`_add_traffic`; `add_traffic` in
# sql/015_shared_counter_upserts.sql).
_ADD_TRAFFIC = """
SELECT add_traffic($1::bigint[], $2::date, $3::bigint[], $4::bigint[], $5::bigint[])
"""

_ASSIGNMENTS_STAGING = """
CREATE TEMPORARY TABLE IF NOT EXISTS assignments_in
    (LIKE assignments INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""

_INSERT_STAGED_ASSIGNMENTS = """
INSERT INTO assignments SELECT * FROM assignments_in ON CONFLICT DO NOTHING
"""

_RECORD_CONVERSIONS = """
SELECT record_conversions($1::text[], $2::bigint[], $3::text[], $4::smallint[], $5::text[],
                          $6::float8[], $7::text[], $8::timestamptz[], $9::date, $10::integer[],
                          $11::bigint[])
"""

_INSERT_SEGMENTS = """
INSERT INTO context_segments (experiment_id, segment_hash, segment_key, level, parent_hash,
                              dimensions)
SELECT s.experiment_id, s.segment_hash, s.segment_key, s.level, s.parent_hash,
       s.dimensions::jsonb
FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::smallint[], $5::bigint[], $6::text[])
     AS s(experiment_id, segment_hash, segment_key, level, parent_hash, dimensions)
ORDER BY s.experiment_id, s.segment_hash
ON CONFLICT (experiment_id, segment_hash) DO NOTHING
"""

_EXPERIMENTS_FINGERPRINT = (
    "SELECT count(*) AS n, coalesce(sum(hashtextextended("
    "id::text || '@' || (extract(epoch FROM updated_at) * 1000000)::bigint::text, 0)"
    "::numeric), 0) % 9223372036854775807 AS h FROM experiments"
)

# Held by the transaction that refreshes the analytics view (`refresh_analytics`).
_ANALYTICS_LOCK = 0x616C6C6F632D6D76  # "alloc-mv" in ASCII (the migration lock is "allocsvc")
# Seconds since the view was refreshed (every row carries the time; None while it is empty).
_ANALYTICS_AGE = (
    "SELECT extract(epoch FROM clock_timestamp() - refreshed_at)::float8"
    " FROM mv_segment_analytics LIMIT 1"
)

_INSERT_BLOCK = "INSERT INTO assignment_blocks (rows, payload, filter) VALUES ($1, $2, $3)"

# The oldest block up to id $1, locked; another connection's block is skipped (the background
# expander) or waited for (a reader that must see every assignment: the block is gone once that
# connection commits).
_NEXT_BLOCK = (
    "SELECT id, rows, payload FROM assignment_blocks WHERE id <= $1 ORDER BY id LIMIT 1 FOR UPDATE"
)
_BLOCK_BACKLOG = """
SELECT coalesce(sum(rows), 0) AS rows,
       extract(epoch FROM clock_timestamp() - max(created_at)) AS newest_age_s
FROM assignment_blocks
"""
_LAST_BLOCK = "SELECT max(id) FROM assignment_blocks"
# The same, among the blocks $1 (a reader's: the others may not hold what it looks for).
_NEXT_BLOCK_OF = (
    "SELECT id, rows, payload FROM assignment_blocks WHERE id = ANY($1::bigint[])"
    " ORDER BY id LIMIT 1 FOR UPDATE"
)
_BLOCK_PAYLOADS = "SELECT payload, created_at FROM assignment_blocks WHERE id = ANY($1::bigint[])"
_BLOCK_PAYLOAD = "SELECT payload, created_at FROM assignment_blocks WHERE id = $1"
_BLOCK_FILTERS = (
    "SELECT id, coalesce(filter, ''::bytea) AS filter FROM assignment_blocks"
    " WHERE id = ANY($1::bigint[])"
)

# Assignments in the order they were made. Ties of `created_at` (a batch's assignments share
# their millisecond) go by id: own ids are `{prefix}-{seq:x}`, hex without padding, so a longer
# one of a prefix is a later one (as text `p-ff` sorts after `p-100`).
_MADE_ORDER = "created_at, length(id), id"
_NEWEST_FIRST = "created_at DESC, length(id) DESC, id DESC"

_ASSIGNMENT_COLUMNS = (
    "id, experiment_id, user_id, variant, segment_key, segment_hash, cascade_level, propensity,"
    " context, region, created_at"
)

# The latest stored assignment of each of users $2 in experiment $1: their rows found through
# the index on a hash of the user id (sql/017_assignments_user_hash_index.sql), which serves
# only a condition on its expression; the user ids and the experiment then filter them.
_LATEST_ASSIGNMENTS = (
    f"SELECT DISTINCT ON (user_id) {_ASSIGNMENT_COLUMNS} FROM assignments"
    " WHERE hashtextextended(user_id, 0) = ANY"
    " (ARRAY(SELECT hashtextextended(u, 0) FROM unnest($2::text[]) AS u))"
    " AND user_id = ANY($2::text[]) AND experiment_id = $1"
    f" ORDER BY user_id, {_NEWEST_FIRST}"
)


class PostgresStore:
    """Typed access to the allocsvc schema through an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # The filters of the blocks seen (blocks never change; an empty one: no filter).
        self._block_filters: dict[int, bytes] = {}

    @classmethod
    async def connect(
        cls,
        dsn: str,
        min_size: int = 1,
        max_size: int = 10,
        *,
        command_timeout: float | None = None,
    ) -> PostgresStore:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=command_timeout,
            init=_init_connection,
            reset=_reset_connection,
        )
        return cls(pool)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def close(self, timeout: float = POOL_CLOSE_TIMEOUT_S) -> None:
        """Close the pool; connections still held after `timeout` seconds (a query that does
        not return, a connection attempt to a server that does not answer) are terminated, so
        that a stop ends."""
        try:
            await asyncio.wait_for(self._pool.close(), timeout)
        except TimeoutError:
            log.warning(
                "postgres pool not closed in time: terminating its connections",
                extra={"seconds": timeout},
            )
            self._pool.terminate()

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # experiments

    async def insert_experiment(self, experiment: ExperimentRow) -> ExperimentRow:
        """Insert an experiment and its variants; return it with id and timestamps."""
        async with self._pool.acquire() as conn, conn.transaction():
            try:
                row = await conn.fetchrow(
                    "INSERT INTO experiments (key, name, description, status, policy, config,"
                    " sticky, propensity_floor) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    " RETURNING *",
                    experiment.key,
                    experiment.name,
                    experiment.description,
                    experiment.status,
                    experiment.policy,
                    experiment.config,
                    experiment.sticky,
                    experiment.propensity_floor,
                )
                await _insert_variants(conn, int(row["id"]), experiment.variants)
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(f"experiment {experiment.key!r}: {exc.detail}") from exc
        return _experiment(row, experiment.variants)

    async def update_experiment(self, experiment: ExperimentRow) -> ExperimentRow:
        """Replace an experiment's fields and variant list, found by its key."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE experiments SET name = $2, description = $3, status = $4, policy = $5,"
                " config = $6, sticky = $7, propensity_floor = $8, updated_at = now()"
                " WHERE key = $1 RETURNING *",
                experiment.key,
                experiment.name,
                experiment.description,
                experiment.status,
                experiment.policy,
                experiment.config,
                experiment.sticky,
                experiment.propensity_floor,
            )
            if row is None:
                raise NotFoundError(f"experiment {experiment.key!r}")
            await conn.execute("DELETE FROM variants WHERE experiment_id = $1", row["id"])
            try:
                await _insert_variants(conn, int(row["id"]), experiment.variants)
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(f"experiment {experiment.key!r}: {exc.detail}") from exc
        return _experiment(row, experiment.variants)

    async def get_experiment(self, key: str) -> ExperimentRow | None:
        found = await self._experiments("WHERE key = $1", key)
        return found[0] if found else None

    async def get_experiment_by_id(self, experiment_id: int) -> ExperimentRow | None:
        found = await self._experiments("WHERE id = $1", experiment_id)
        return found[0] if found else None

    async def list_experiments(self, statuses: Sequence[str] | None = None) -> list[ExperimentRow]:
        """All experiments (or those in `statuses`), oldest first."""
        if statuses is None:
            return await self._experiments("")
        return await self._experiments("WHERE status = ANY($1::text[])", list(statuses))

    async def experiments_fingerprint(self) -> tuple[int, int]:
        """(how many experiments, a sum of hashes of each one's id and `updated_at`): it
        changes when one is created, deleted or updated (`update_experiment` sets `updated_at`),
        whatever order the transactions commit in."""
        row = await self._pool.fetchrow(_EXPERIMENTS_FINGERPRINT)
        return int(row["n"]), int(row["h"])

    async def _experiments(self, where: str, *args: Any) -> list[ExperimentRow]:
        # `where` is one of the fixed clauses above, never built from input
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows = await conn.fetch(f"SELECT * FROM experiments {where} ORDER BY id", *args)
            variants = await conn.fetch(
                "SELECT * FROM variants WHERE experiment_id = ANY($1::bigint[])"
                " ORDER BY experiment_id, index",
                [r["id"] for r in rows],
            )
        by_experiment: dict[int, list[VariantRow]] = {}
        for v in variants:
            by_experiment.setdefault(int(v["experiment_id"]), []).append(
                VariantRow(
                    index=int(v["index"]),
                    key=str(v["key"]),
                    name=str(v["name"]),
                    weight=None if v["weight"] is None else float(v["weight"]),
                    payload=dict(v["payload"]),
                )
            )
        return [_experiment(r, by_experiment.get(int(r["id"]), [])) for r in rows]

    # segmentation config

    async def get_segmentation_config(self, experiment_id: int) -> SegmentationConfigRow | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM segmentation_config WHERE experiment_id = $1", experiment_id
        )
        return None if row is None else _segmentation_config(row)

    async def upsert_segmentation_config(
        self, config: SegmentationConfigRow
    ) -> SegmentationConfigRow:
        row = await self._pool.fetchrow(
            "INSERT INTO segmentation_config (experiment_id, mode, segment_by,"
            " min_samples_per_segment, auto_activation, auto_activation_threshold, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, now())"
            " ON CONFLICT (experiment_id) DO UPDATE SET mode = EXCLUDED.mode,"
            " segment_by = EXCLUDED.segment_by,"
            " min_samples_per_segment = EXCLUDED.min_samples_per_segment,"
            " auto_activation = EXCLUDED.auto_activation,"
            " auto_activation_threshold = EXCLUDED.auto_activation_threshold,"
            " updated_at = EXCLUDED.updated_at"
            " RETURNING *",
            config.experiment_id,
            config.mode,
            list(config.segment_by),
            config.min_samples_per_segment,
            config.auto_activation,
            config.auto_activation_threshold,
        )
        return _segmentation_config(row)

    # posterior counters

    async def apply_count_deltas(self, rows: Sequence[CountRow]) -> None:
        """Add (allocations, conversions, value sum) deltas to the counters, in one statement."""
        if not rows:
            return
        args = _count_arrays(rows)

        async def run(conn: Any) -> None:
            await conn.execute(_UPSERT_COUNTS, *args)

        await self._with_retry(run)

    async def load_counts(self, experiment_id: int | None = None) -> list[CountRow]:
        """Every counter row (or one experiment's), hashes as unsigned 64-bit integers."""
        rows = await self._pool.fetch(
            "SELECT experiment_id, segment_hash, variant, allocations, conversions, value_sum"
            " FROM segment_variant_state WHERE $1::bigint IS NULL OR experiment_id = $1"
            " ORDER BY experiment_id, segment_hash, variant",
            experiment_id,
        )
        return [
            (
                int(r["experiment_id"]),
                to_unsigned64(r["segment_hash"]),
                int(r["variant"]),
                int(r["allocations"]),
                int(r["conversions"]),
                float(r["value_sum"]),
            )
            for r in rows
        ]

    # assignments

    async def insert_assignments(self, rows: Sequence[AssignmentRow]) -> int:
        """Insert assignments; an existing id is kept. Returns rows added."""
        if not rows:
            return 0
        status = await self._pool.execute(
            _INSERT_ASSIGNMENTS,
            [r.id for r in rows],
            [r.experiment_id for r in rows],
            [r.user_id for r in rows],
            [r.variant for r in rows],
            [r.segment_key for r in rows],
            [to_signed64(r.segment_hash) for r in rows],
            [r.cascade_level for r in rows],
            [r.propensity for r in rows],
            [_json(r.context) for r in rows],
            [r.region for r in rows],
            [r.created_at for r in rows],
        )
        return _affected(status)

    async def write_behind(self, flush: WriteBehind) -> bool:
        """Write one write-behind flush in one transaction: its assignments (one binary COPY
        stream, columns `ASSIGNMENT_COPY_COLUMNS`; an existing id is kept), new segments,
        daily traffic and allocation counts. False
        when a flush with this token was committed already (a retry after an unacknowledged
        commit): then nothing changes.

        With `flush.blocks`, the assignments go in as rows of `assignment_blocks` (see
        `expand_blocks`): a large flush then costs PostgreSQL a write per block, not three
        index entries per assignment.

        Committed without waiting for the WAL flush (`synchronous_commit = off`, this
        transaction only): everything here was answered before it was written, so a database
        crash may lose the last fraction of a second of it, as a server crash loses its
        unwritten buffer. Durable-when-acknowledged writes (conversions) still wait.
        """
        today = datetime.now(UTC).date()

        async def run(connection: Any) -> bool:
            async with connection.transaction():
                await connection.execute("SET LOCAL synchronous_commit = off")
                if await connection.fetchval(_CLAIM_FLUSH, flush.token) is None:
                    return False
                if flush.blocks:
                    await connection.executemany(
                        _INSERT_BLOCK, [(b.rows, b.payload, b.filter or None) for b in flush.blocks]
                    )
                if flush.copy_rows:
                    await self._copy_assignments(connection, flush.copy_rows)
                if flush.segments:
                    await connection.execute(_INSERT_SEGMENTS, *_segment_arrays(flush.segments))
                if flush.visitors:
                    visits = {e: (n, n, 0) for e, n in flush.visitors.items()}
                    await _add_traffic(connection, today, visits)
                if flush.counts:
                    await connection.execute(_UPSERT_COUNTS, *_count_arrays(flush.counts))
                return True

        return await self._with_retry(run)

    @staticmethod
    async def _copy_assignments(
        connection: Any, data: bytes, columns: list[str] = ASSIGNMENT_COPY_COLUMNS
    ) -> None:
        """COPY cannot skip existing rows: when some exist (rows of a flush written before
        under another token, e.g. by an older server), they go through a temporary table."""
        rows = memoryview(data)  # asyncpg would take bytes for a file name
        try:
            async with connection.transaction():  # a savepoint
                await connection.copy_to_table(
                    "assignments", source=rows, columns=columns, format="binary"
                )
        except asyncpg.UniqueViolationError:
            await connection.execute(_ASSIGNMENTS_STAGING)
            await connection.copy_to_table(
                "assignments_in", source=rows, columns=columns, format="binary"
            )
            await connection.execute(_INSERT_STAGED_ASSIGNMENTS)

    async def expand_blocks(
        self,
        *,
        limit: int | None = None,
        wait: bool = False,
        through: int = 2**63 - 1,
        only: Sequence[int] | None = None,
    ) -> int:
        """Move blocks of `assignment_blocks` (ids up to `through`; with `only`, those of its
        ids) into `assignments`, oldest first, at most `limit` (None: all), each in a
        transaction of its own (its rows inserted, the block deleted); how many assignments
        they held. A block another connection is expanding is skipped, or with `wait` waited
        for (it is gone once that commits)."""
        query = _NEXT_BLOCK if only is None else _NEXT_BLOCK_OF
        query = query if wait else query + " SKIP LOCKED"
        argument: Any = through if only is None else list(only)
        expanded = blocks = 0
        async with self._pool.acquire() as connection:
            while limit is None or blocks < limit:
                async with connection.transaction():
                    # The rows were durable as the block; a lost commit keeps the block.
                    await connection.execute("SET LOCAL synchronous_commit = off")
                    block = await connection.fetchrow(query, argument)
                    if block is None:
                        break
                    rows = await asyncio.to_thread(decompress_block, block["payload"])
                    await self._copy_assignments(connection, rows, _stream_columns(rows))
                    await connection.execute(
                        "DELETE FROM assignment_blocks WHERE id = $1", block["id"]
                    )
                expanded += int(block["rows"])
                blocks += 1
        return expanded

    async def unexpanded_assignments(self) -> int:
        """Assignments in `assignment_blocks`, not yet expanded into `assignments`."""
        return (await self.block_backlog())[0]

    async def block_backlog(self) -> tuple[int, float | None]:
        """`unexpanded_assignments`, and how long ago (s, by the database's clock) the newest
        block was written; None when there is none."""
        row = await self._pool.fetchrow(_BLOCK_BACKLOG)
        age = row["newest_age_s"]
        return int(row["rows"]), None if age is None else float(age)

    async def expand_all_blocks(self) -> int:
        """Every block written before the call into `assignments` (one query when there are
        none); how many assignments they held. Blocks written meanwhile are left. No reader
        needs it any more (a restart and lookups read blocks, an export or erasure expands
        `expand_blocks_of_user`); benches and tests use it to set the table straight."""
        last = await self._pool.fetchval(_LAST_BLOCK)
        if last is None:
            return 0
        expanded = await self.expand_blocks(wait=True, through=last)
        log.info("assignment blocks expanded", extra={"assignments": expanded})
        return expanded

    async def _block_filters_now(
        self, through: int | None = None
    ) -> tuple[list[int], dict[int, bytes]]:
        """The ids of the blocks stored now (up to `through`), and their filters by id (empty
        for a block stored before filters), cached: a filter never changes. A block gone
        before its filter was read is not among them: it was expanded, its rows are in
        `assignments`."""
        ids = [r["id"] for r in await self._pool.fetch("SELECT id FROM assignment_blocks")]
        cache = self._block_filters
        for gone in cache.keys() - set(ids):
            del cache[gone]
        if through is not None:
            ids = [i for i in ids if i <= through]
        # Kept apart from the cache, which a concurrent lookup may prune meanwhile.
        filters = {i: cache[i] for i in ids if i in cache}
        unknown = [i for i in ids if i not in filters]
        if unknown:
            for r in await self._pool.fetch(_BLOCK_FILTERS, unknown):
                filters[r["id"]] = cache[r["id"]] = bytes(r["filter"])
        return ids, filters

    async def expand_blocks_of_user(self, user_id: str) -> int:
        """Expand the blocks written before the call that may hold an assignment of `user_id`
        (its filter passes the user in some experiment; every block without a filter), not
        the others: what an export or erasure of one user needs, a few blocks (about 0.2 s
        each) where `expand_all_blocks` takes the whole backlog at the table's row rate. The
        user's experiments are those of `experiments` (a server writes assignments only of
        experiments stored there, and the export and erasure SQL finds them by experiment).
        How many assignments they held."""
        last = await self._pool.fetchval(_LAST_BLOCK)
        if last is None:
            return 0
        ids, filters = await self._block_filters_now(through=last)
        handles = [r["id"] for r in await self._pool.fetch("SELECT id FROM experiments")]
        unfiltered, passed = _blocks_to_read(
            ids,
            filters,
            lambda bits: sorted(
                {k for h in handles for k in filters_may_hold_users(bits, h, [user_id])}
            ),
        )
        wanted = sorted(unfiltered + passed)
        expanded = await self.expand_blocks(wait=True, only=wanted) if wanted else 0
        log.info(
            "assignment blocks of a user expanded",
            extra={"assignments": expanded, "blocks": len(wanted), "of": len(ids)},
        )
        return expanded

    async def _read_blocks_that_may_hold(
        self,
        holding: Callable[[list[bytes]], list[int]],
        rows_of: Callable[[bytes], list[BlockRow]],
    ) -> tuple[list[AssignmentRow], bool]:
        """What a lookup of users or ids finds in the blocks: `rows_of` each block whose filter
        is among those `holding` gives (positions in the filters it is given, one call for
        all: `filters_may_hold_users` / `_ids`), read from its payload without expanding it
        (about 20,000 rows: a few ms, against ~0.2 s to expand it); blocks without a filter
        (stored before filters) are expanded first, as `expand_all_blocks` would. Also whether
        `assignments` may have gained rows it looks for: blocks were expanded, here or (one
        whose filter passed was gone when read) by another connection meanwhile."""
        ids, filters = await self._block_filters_now()
        unfiltered, wanted = _blocks_to_read(ids, filters, holding)
        if unfiltered:
            expanded = await self.expand_blocks(wait=True, only=unfiltered)
            log.info(
                "assignment blocks without a filter expanded for a lookup",
                extra={"assignments": expanded, "blocks": len(unfiltered), "of": len(ids)},
            )
        if not wanted:
            return [], bool(unfiltered)
        blocks = await self._pool.fetch(_BLOCK_PAYLOADS, wanted)
        found: list[AssignmentRow] = []
        for block in blocks:
            rows = await asyncio.to_thread(rows_of, block["payload"])
            found += [_block_row(r, block["created_at"]) for r in rows]
        return found, bool(unfiltered) or len(blocks) < len(wanted)

    async def get_assignment(self, experiment_id: int, user_id: str) -> AssignmentRow | None:
        return (await self.get_latest_assignments(experiment_id, [user_id])).get(user_id)

    async def get_latest_assignments(
        self, experiment_id: int, user_ids: Sequence[str]
    ) -> dict[str, AssignmentRow]:
        """The latest assignment in the experiment of each of `user_ids` that has one, by user:
        read from the blocks whose filters may hold one of them, and by one query."""
        wanted = list(dict.fromkeys(user_ids))
        # Blocks first: one expanded after they are read has its rows in the table by the
        # query that follows.
        found, _ = await self._read_blocks_that_may_hold(
            lambda f: filters_may_hold_users(f, experiment_id, wanted),
            lambda b: block_rows_of_users(b, experiment_id, wanted),
        )
        rows = await self._pool.fetch(_LATEST_ASSIGNMENTS, experiment_id, wanted)
        latest: dict[str, AssignmentRow] = {}
        for row in itertools.chain(found, map(_assignment, rows)):
            known = latest.get(row.user_id)
            if known is None or _newer(row, known):
                latest[row.user_id] = row
        return latest

    async def get_assignment_by_id(self, assignment_id: str) -> AssignmentRow | None:
        return (await self.get_assignments_by_ids([assignment_id])).get(assignment_id)

    async def get_assignments_by_ids(self, ids: Sequence[str]) -> dict[str, AssignmentRow]:
        """The assignments with these ids that are stored, by id: from the table, then those
        not in it from the blocks whose filters may hold them (the table again for any a
        block expanded meanwhile took there)."""
        query = f"SELECT {_ASSIGNMENT_COLUMNS} FROM assignments WHERE id = ANY($1::text[])"
        wanted = list(dict.fromkeys(ids))
        found = {r.id: r for r in map(_assignment, await self._pool.fetch(query, wanted))}
        missing = [i for i in wanted if i not in found]
        if not missing:
            return found
        in_blocks, recheck = await self._read_blocks_that_may_hold(
            lambda f: filters_may_hold_ids(f, missing),
            lambda b: block_rows_of_ids(b, missing),
        )
        found.update((r.id, r) for r in in_blocks)
        missing = [i for i in missing if i not in found]
        if recheck and missing:
            found.update(
                (r.id, r) for r in map(_assignment, await self._pool.fetch(query, missing))
            )
        return found

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Any]:
        """A connection in a read-only REPEATABLE READ transaction: what it reads is as of
        one moment, so a block another process expands meanwhile is read as a block and its
        rows are not in the table yet (a restart's reads: `copy_out_assignments`,
        `read_blocks`)."""
        async with (
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield connection

    async def read_blocks(
        self, connection: Any, take: Callable[[bytes, int], tuple[int, int]]
    ) -> tuple[int, int, int]:
        """Give each block of `assignment_blocks` as of `connection`'s snapshot, oldest first
        and one at a time, to `take(payload, made_ms)` (`made_ms`: when the block was stored,
        the time of rows stored without theirs), without expanding it: (blocks, their rows,
        and what `take` returned second, summed). `take` runs on the event loop's thread (a
        restart's, before it serves: about 20 ms a block; on a worker thread the held store
        grew in another malloc arena, 1.5x the memory, bench/RESULTS.md item 36)."""
        blocks = rows = taken = 0
        async for payload, made_ms in self.stored_blocks(connection):
            n, k = take(payload, made_ms)
            blocks += 1
            rows += n
            taken += k
        return blocks, rows, taken

    async def stored_blocks(self, connection: Any) -> AsyncIterator[tuple[bytes, int]]:
        """Each block of `assignment_blocks` as of `connection`'s snapshot, oldest first and
        one at a time: (payload, made_ms) as `read_blocks` gives them to `take`."""
        for r in await connection.fetch("SELECT id FROM assignment_blocks ORDER BY id"):
            block = await connection.fetchrow(_BLOCK_PAYLOAD, r["id"])
            yield block["payload"], int(block["created_at"].timestamp() * 1000)

    async def copy_out_assignments(
        self,
        experiment_id: int,
        output: Callable[[bytearray], Awaitable[None]],
        *,
        newest: int | None = None,
        connection: Any = None,
    ) -> None:
        """An experiment's stored assignments, oldest first (with `newest`, only its newest
        that many), as a binary COPY stream of `RESTORE_COPY_COLUMNS` given to `output` piece
        by piece as PostgreSQL sends it: the table may hold far more rows than a process could
        keep at once, and a restart reads them without a Python object per row. Assignments
        still in blocks are not read (`read_blocks`). On `connection` (a `snapshot`'s), or one
        of the pool's."""
        columns = ", ".join(RESTORE_COPY_COLUMNS)
        query = f"SELECT {columns} FROM assignments WHERE experiment_id = $1 ORDER BY {_MADE_ORDER}"
        args: tuple[int, ...] = (experiment_id,)
        if newest is not None:
            query = (
                f"SELECT {columns} FROM (SELECT {columns} FROM assignments"
                f" WHERE experiment_id = $1 ORDER BY {_NEWEST_FIRST} LIMIT $2) AS newest"
                f" ORDER BY {_MADE_ORDER}"
            )
            args = (experiment_id, newest)
        given = None if connection is None else contextlib.nullcontext(connection)
        async with given or self._pool.acquire() as reader:
            await reader.copy_from_query(query, *args, output=output, format="binary")

    async def copy_out_users(
        self,
        experiment_id: int,
        output: Callable[[bytearray], Awaitable[None]],
        *,
        connection: Any = None,
    ) -> None:
        """The user ids of an experiment's stored assignments (one per assignment, in no
        order), as a binary COPY stream of one text column given to `output` piece by piece.
        Assignments still in blocks are not read (as `copy_out_assignments`). On `connection`
        (a `snapshot`'s), or one of the pool's."""
        query = "SELECT user_id FROM assignments WHERE experiment_id = $1"
        given = None if connection is None else contextlib.nullcontext(connection)
        async with given or self._pool.acquire() as reader:
            await reader.copy_from_query(query, experiment_id, output=output, format="binary")

    # conversions

    async def insert_conversions(self, rows: Sequence[ConversionRow]) -> list[bool]:
        """Record conversions exactly once; return, per row, whether it was new and counted.

        In one statement (`record_conversions`, sql/013_record_conversions.sql), its own
        transaction: insert each row unless its (assignment, idempotency key) is known, then
        add the new ones to their experiments' conversions of the day (`traffic_stats`) and one
        conversion (and its value) to the counters of every level of the path of each. A
        repeat, also within the batch, is neither stored nor counted.
        """
        first: dict[tuple[str, str], int] = {}
        for i, r in enumerate(rows):
            first.setdefault((r.assignment_id, r.idempotency_key), i)
        if not first:
            return []
        positions = list(first.values())
        unique = [rows[i] for i in positions]
        # Each level of each row's path as (1-based row, hash); hashes checked before the
        # database is touched.
        path_rows = [n for n, r in enumerate(unique, 1) for _ in r.path_hashes]
        path_hashes = [to_signed64(h) for r in unique for h in r.path_hashes]
        args = (
            [r.assignment_id for r in unique],
            [r.experiment_id for r in unique],
            [r.user_id for r in unique],
            [r.variant for r in unique],
            [r.segment_key for r in unique],
            [float(r.value) for r in unique],
            [r.idempotency_key for r in unique],
            [r.created_at for r in unique],
            datetime.now(UTC).date(),
            path_rows,
            path_hashes,
        )

        async def run(conn: Any) -> list[int]:
            return list(await conn.fetchval(_RECORD_CONVERSIONS, *args))

        new = {positions[n - 1] for n in await self._with_retry(run)}
        return [i in new for i in range(len(rows))]

    # segments

    async def upsert_segments(self, rows: Sequence[SegmentRow]) -> int:
        """Register segments (known ones are kept as they are). Returns rows added."""
        if not rows:
            return 0
        status = await self._pool.execute(_INSERT_SEGMENTS, *_segment_arrays(rows))
        return _affected(status)

    async def list_segments(self, experiment_id: int) -> list[SegmentRow]:
        rows = await self._pool.fetch(
            "SELECT experiment_id, segment_hash, segment_key, level, parent_hash, dimensions"
            " FROM context_segments WHERE experiment_id = $1 ORDER BY level, segment_key",
            experiment_id,
        )
        return [
            SegmentRow(
                experiment_id=int(r["experiment_id"]),
                segment_hash=to_unsigned64(r["segment_hash"]),
                segment_key=str(r["segment_key"]),
                level=int(r["level"]),
                parent_hash=None if r["parent_hash"] is None else to_unsigned64(r["parent_hash"]),
                dimensions=dict(r["dimensions"]),
            )
            for r in rows
        ]

    # traffic, audit, analytics

    async def add_traffic(
        self,
        experiment_id: int,
        day: date,
        visitors: int = 0,
        allocations: int = 0,
        conversions: int = 0,
    ) -> None:
        await _add_traffic(self._pool, day, {experiment_id: (visitors, allocations, conversions)})

    async def get_traffic(self, experiment_id: int, since: date | None = None) -> list[TrafficRow]:
        """Daily traffic of an experiment from `since` (inclusive), oldest first."""
        rows = await self._pool.fetch(
            "SELECT experiment_id, day, visitors, allocations, conversions FROM traffic_stats"
            " WHERE experiment_id = $1 AND ($2::date IS NULL OR day >= $2) ORDER BY day",
            experiment_id,
            since,
        )
        return [
            TrafficRow(
                experiment_id=int(r["experiment_id"]),
                day=r["day"],
                visitors=int(r["visitors"]),
                allocations=int(r["allocations"]),
                conversions=int(r["conversions"]),
            )
            for r in rows
        ]

    # segment hierarchy

    async def save_hierarchy(self, experiment_id: int, rows: Sequence[HierarchyRow]) -> int:
        """Store a built tree as the experiment's next version; return that version."""

        async def run(conn: Any) -> int:
            async with conn.transaction():
                # Serialise concurrent saves of one experiment's versions.
                await conn.execute("SELECT pg_advisory_xact_lock(7311, $1::int)", experiment_id)
                version = int(
                    await conn.fetchval(
                        "SELECT COALESCE(max(version), 0) + 1 FROM segment_hierarchy"
                        " WHERE experiment_id = $1",
                        experiment_id,
                    )
                )
                await conn.execute(
                    "INSERT INTO segment_hierarchy (experiment_id, version, node_hash,"
                    " parent_hash, level, segment_key, allocations, conversions, value_sum,"
                    " stats, pruned)"
                    " SELECT $1, $2, h.node_hash, h.parent_hash, h.level, h.segment_key,"
                    " h.allocations, h.conversions, h.value_sum, h.stats::jsonb, h.pruned"
                    " FROM unnest($3::bigint[], $4::bigint[], $5::smallint[], $6::text[],"
                    " $7::bigint[], $8::bigint[], $9::float8[], $10::text[], $11::bool[])"
                    " AS h(node_hash, parent_hash, level, segment_key, allocations,"
                    " conversions, value_sum, stats, pruned)",
                    experiment_id,
                    version,
                    [to_signed64(r.node_hash) for r in rows],
                    [None if r.parent_hash is None else to_signed64(r.parent_hash) for r in rows],
                    [r.level for r in rows],
                    [r.segment_key for r in rows],
                    [r.allocations for r in rows],
                    [r.conversions for r in rows],
                    [r.value_sum for r in rows],
                    [_json(r.stats) for r in rows],
                    [r.pruned for r in rows],
                )
                return version

        return await self._with_retry(run)

    # recommendations

    async def insert_recommendation(
        self, experiment_id: int, kind: str, payload: Mapping[str, Any]
    ) -> RecommendationRow | None:
        """Store a pending recommendation; None when one of that kind is pending already."""
        row = await self._pool.fetchrow(
            "INSERT INTO recommendations (experiment_id, kind, payload) VALUES ($1, $2, $3)"
            " ON CONFLICT (experiment_id, kind) WHERE status = 'pending' DO NOTHING"
            f" RETURNING {_RECOMMENDATION_COLUMNS}",
            experiment_id,
            kind,
            dict(payload),
        )
        return None if row is None else _recommendation(row)

    async def list_recommendations(
        self, experiment_id: int | None = None, status: str | None = None
    ) -> list[RecommendationRow]:
        rows = await self._pool.fetch(
            f"SELECT {_RECOMMENDATION_COLUMNS} FROM recommendations"
            " WHERE ($1::bigint IS NULL OR experiment_id = $1)"
            " AND ($2::text IS NULL OR status = $2) ORDER BY created_at DESC, id DESC",
            experiment_id,
            status,
        )
        return [_recommendation(r) for r in rows]

    async def get_recommendation(self, recommendation_id: int) -> RecommendationRow | None:
        row = await self._pool.fetchrow(
            f"SELECT {_RECOMMENDATION_COLUMNS} FROM recommendations WHERE id = $1",
            recommendation_id,
        )
        return None if row is None else _recommendation(row)

    async def decide_recommendation(
        self, recommendation_id: int, status: str, actor: str
    ) -> RecommendationRow | None:
        """Accept or dismiss a pending recommendation; None when it is not pending."""
        row = await self._pool.fetchrow(
            "UPDATE recommendations SET status = $2, decided_at = now(), decided_by = $3"
            f" WHERE id = $1 AND status = 'pending' RETURNING {_RECOMMENDATION_COLUMNS}",
            recommendation_id,
            status,
            actor,
        )
        return None if row is None else _recommendation(row)

    async def write_audit(
        self, actor: str, action: str, target: str, details: Mapping[str, Any] | None = None
    ) -> int:
        """Append to the audit log; return the entry's id."""
        entry_id = await self._pool.fetchval(
            "INSERT INTO audit_log (actor, action, target, details) VALUES ($1, $2, $3, $4)"
            " RETURNING id",
            actor,
            action,
            target,
            dict(details or {}),
        )
        return int(entry_id)

    async def refresh_analytics(self, older_than_s: float = 0.0) -> bool:
        """Refresh `mv_segment_analytics` without blocking its readers; whether it did. Not
        while another connection refreshes it (every process's write-behind refreshes it, and a
        refresh of millions of counters takes minutes: a second one would only queue behind the
        first), nor when its rows were refreshed less than `older_than_s` seconds ago."""
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _ANALYTICS_LOCK):
                return False
            age = await conn.fetchval(_ANALYTICS_AGE)
            if age is not None and age < older_than_s:
                return False
            await conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY mv_segment_analytics")
            return True

    async def _with_retry(self, run: Callable[[Any], Awaitable[_T]]) -> _T:
        # A deadlock aborts the whole transaction, so running it again cannot double-count.
        for attempt in range(_DEADLOCK_RETRIES):
            try:
                async with self._pool.acquire() as conn:
                    return await run(conn)
            except asyncpg.DeadlockDetectedError:
                if attempt == _DEADLOCK_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")


async def _init_connection(conn: Any) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(type_name, encoder=_json, decoder=json.loads, schema="pg_catalog")


def _blocks_to_read(
    ids: Sequence[int],
    filters: Mapping[int, bytes],
    holding: Callable[[list[bytes]], list[int]],
) -> tuple[list[int], list[int]]:
    """Of the blocks `ids` (`_block_filters_now`), those without a filter (stored before
    filters: they may hold anything), and those whose filter `holding` passes (one call over
    all of them; it answers positions in the filters it is given)."""
    unfiltered = [i for i in ids if i in filters and not filters[i]]
    filtered = [i for i in ids if filters.get(i)]
    return unfiltered, [filtered[k] for k in holding([filters[i] for i in filtered])]


async def _add_traffic(
    connection: Any, day: date, per_experiment: Mapping[int, tuple[int, int, int]]
) -> None:
    """Add (visitors, allocations, conversions) to each experiment's traffic of `day`, in one
    statement (`add_traffic`, which takes the rows in ascending experiment order: a flush (its
    visitors) and a conversion group (its conversions) lock them in one order, each before its
    counters)."""
    handles = list(per_experiment)
    columns = ([per_experiment[h][k] for h in handles] for k in range(3))
    await connection.execute(_ADD_TRAFFIC, handles, day, *columns)


async def _reset_connection(conn: Any) -> None:
    """Nothing beyond what asyncpg does on every release anyway (an open transaction rolled
    back, listeners dropped): pooled connections keep no session state (locks are taken per
    transaction, settings with SET LOCAL, cursors live in transactions, nothing LISTENs; the
    migration runner's session lock is released or its connection closed), so the default reset
    query (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) was a round trip per release for
    nothing: a lookup of a user not in memory paid it three times (bench/RESULTS.md item 38)."""


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _affected(status: str) -> int:
    # asyncpg returns the command tag, e.g. "INSERT 0 3"
    return int(status.rsplit(" ", 1)[-1])


def _stream_columns(stream: bytes) -> list[str]:
    """The columns of an assignment COPY stream: `ASSIGNMENT_COPY_COLUMNS`, or as many of its
    first as the stream's rows have (blocks stored before `created_at` was written have eight;
    their rows take the database's now())."""
    # Signature (11 bytes), flags and header extension length (4 each), then the first row's
    # field count, or the trailer's -1 when there is no row.
    fields = struct.unpack_from(">h", stream, 19)[0]
    return ASSIGNMENT_COPY_COLUMNS[:fields] if fields > 0 else ASSIGNMENT_COPY_COLUMNS


def _segment_arrays(rows: Sequence[SegmentRow]) -> tuple[list[Any], ...]:
    return (
        [r.experiment_id for r in rows],
        [to_signed64(r.segment_hash) for r in rows],
        [r.segment_key for r in rows],
        [r.level for r in rows],
        [None if r.parent_hash is None else to_signed64(r.parent_hash) for r in rows],
        [_json(r.dimensions) for r in rows],
    )


def _count_arrays(rows: Sequence[CountRow]) -> tuple[list[Any], ...]:
    return (
        [r[0] for r in rows],
        [to_signed64(r[1]) for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        [r[4] for r in rows],
        [float(r[5]) for r in rows],
    )


async def _insert_variants(conn: Any, experiment_id: int, variants: Sequence[VariantRow]) -> None:
    if not variants:
        return
    await conn.execute(
        _INSERT_VARIANTS,
        experiment_id,
        [v.index for v in variants],
        [v.key for v in variants],
        [v.name for v in variants],
        [v.weight for v in variants],
        [_json(v.payload) for v in variants],
    )


def _experiment(row: Any, variants: Sequence[VariantRow]) -> ExperimentRow:
    return ExperimentRow(
        id=int(row["id"]),
        key=str(row["key"]),
        name=str(row["name"]),
        description=str(row["description"]),
        status=str(row["status"]),
        policy=str(row["policy"]),
        config=dict(row["config"]),
        sticky=bool(row["sticky"]),
        variants=sorted(variants, key=lambda v: v.index),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        propensity_floor=float(row["propensity_floor"]),
    )


def _segmentation_config(row: Any) -> SegmentationConfigRow:
    return SegmentationConfigRow(
        experiment_id=int(row["experiment_id"]),
        mode=str(row["mode"]),
        segment_by=list(row["segment_by"]),
        min_samples_per_segment=int(row["min_samples_per_segment"]),
        auto_activation=bool(row["auto_activation"]),
        auto_activation_threshold=int(row["auto_activation_threshold"]),
        updated_at=row["updated_at"],
    )


_RECOMMENDATION_COLUMNS = (
    "id, experiment_id, kind, payload, status, created_at, decided_at, decided_by"
)


def _recommendation(row: Any) -> RecommendationRow:
    return RecommendationRow(
        id=int(row["id"]),
        experiment_id=int(row["experiment_id"]),
        kind=str(row["kind"]),
        payload=dict(row["payload"]),
        status=str(row["status"]),
        created_at=row["created_at"],
        decided_at=row["decided_at"],
        decided_by=row["decided_by"],
    )


_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def datetime_of_ms(ms: int) -> datetime:
    """An assignment's `created_ms` (Unix milliseconds) as `created_at`, exactly (no float)."""
    return _UNIX_EPOCH + timedelta(milliseconds=ms)


def _newer(a: AssignmentRow, b: AssignmentRow) -> bool:
    """Whether `a` comes before `b` in `_NEWEST_FIRST`'s order (ids C-collated: by code
    point)."""
    return (a.created_at, len(a.id), a.id) > (b.created_at, len(b.id), b.id)


def _block_row(r: BlockRow, written: datetime) -> AssignmentRow:
    """A row of a block as `assignments` would hold it once expanded. A block stored before
    rows carried `created_at` gives its rows the time it was written (expanded, they take the
    time of expansion)."""
    id_, handle, user_id, variant, segment_key, segment_hash, level, propensity, ms = r
    return AssignmentRow(
        id=id_,
        experiment_id=handle,
        user_id=user_id,
        variant=variant,
        segment_key=segment_key,
        segment_hash=segment_hash,
        cascade_level=level,
        propensity=propensity,
        created_at=written if ms is None else datetime_of_ms(ms),
    )


def _assignment(row: Any) -> AssignmentRow:
    return AssignmentRow(
        id=str(row["id"]),
        experiment_id=int(row["experiment_id"]),
        user_id=str(row["user_id"]),
        variant=int(row["variant"]),
        segment_key=str(row["segment_key"]),
        segment_hash=to_unsigned64(row["segment_hash"]),
        cascade_level=int(row["cascade_level"]),
        propensity=None if row["propensity"] is None else float(row["propensity"]),
        context=dict(row["context"]),
        region=row["region"],
        created_at=row["created_at"],
    )
