"""A batch's new assignments reach PostgreSQL as they are held in memory: columns in Rust,
one binary COPY per flush, in one transaction with the flush's counts; a flush retried after
an unacknowledged commit changes nothing, rows written under another flush are kept once; a
user erased before the flush is never written; a slow analytics refresh holds no flush; a
flush's claim of its token reads only the expired tokens it deletes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from store_support import (
    COUNTRIES,
    HELD_COLUMNS,
    as_row,
    assignment_rows,
    batch_request,
    batch_service,
)

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.service import AllocationService, Assignment
from allocsvc.api import convert
from allocsvc.core import copy_assignments, key_hash
from allocsvc.store import PostgresStore
from allocsvc.store.postgres import _CLAIM_FLUSH, WriteBehind
from allocsvc.store.writebehind import PostgresJournal

pytestmark = pytest.mark.integration

COLUMNS = f"{HELD_COLUMNS}, context, region"


async def _after_batch(
    store: PostgresStore, users: range
) -> tuple[AllocationService, PostgresJournal]:
    """A service whose journal holds one allocated batch of `users`, not flushed yet."""
    journal = PostgresJournal(store)
    service = await batch_service(journal)
    prepared = service.prepare_batch(batch_request(users))
    assert prepared is not None
    service.finish_batch(prepared, "", {}, {})
    return service, journal


async def test_a_batch_is_written_as_held_and_a_repeat_adds_nothing(
    store: PostgresStore, migrated_db: str
) -> None:
    service, journal = await _after_batch(store, range(300))
    single = await service.allocate(
        convert.allocate_request(pb.AllocateRequest(experiment_id="one", user_id="solo"))
    )
    made = list(journal._made)
    assert sum(map(len, made)) == 300
    await journal.flush()
    assert journal.stats.assignments_written == 301
    rows = await assignment_rows(migrated_db, COLUMNS)
    assert len(rows) == 301
    held = [service.user_assignments(f"user-{i}")[0] for i in range(300)]
    held.append(single.assignment)
    for a in held:
        row = rows[a.id]
        assert row[:9] == as_row(a)
        assert row[9] == "{}" and row[10] is None
    assert {a.segment_key for a in held[:-1]} == {f"country:{c}" for c in COUNTRIES}
    one = held[0]
    count = (one.handle, key_hash(one.segment_key), one.variant, 1, 0, 0.0)

    async def allocations() -> int:
        counts = await store.load_counts(one.handle)
        return sum(c[3] for c in counts if c[1:3] == count[1:3])

    before = await allocations()
    flush = WriteBehind("retried", copy_assignments(made), [], {one.handle: 1}, [count])
    # Rows written already under another flush: kept once, the rest of the flush applies.
    assert await store.write_behind(flush)
    assert await assignment_rows(migrated_db, COLUMNS) == rows
    assert await allocations() == before + 1
    # The same flush again (its commit was not acknowledged): nothing changes.
    assert not await store.write_behind(flush)
    assert await assignment_rows(migrated_db, COLUMNS) == rows
    assert await allocations() == before + 1
    await journal.close()


async def test_a_user_erased_before_the_flush_is_never_written(
    store: PostgresStore, migrated_db: str
) -> None:
    service, journal = await _after_batch(store, range(20))
    pending = journal.pending_assignments_of("user-7")
    assert [r.user_id for r in pending] == ["user-7"]
    (held,) = service.user_assignments("user-7")
    assert pending[0].created_at is not None
    assert pending[0].created_at.timestamp() * 1000 == pytest.approx(held.created_ms, abs=0.5)

    async def nothing() -> int:
        return 0

    dropped, _ = await journal.without_user("user-7", nothing)
    forgotten = service.forget_user("user-7")
    assert [r.id for r in dropped] == [a.id for a in forgotten]
    assert service.user_assignments("user-7") == []
    await journal.flush()
    rows = await assignment_rows(migrated_db, COLUMNS)
    assert len(rows) == 19
    assert "user-7" not in {r[2] for r in rows.values()}
    assert all(isinstance(a, Assignment) for a in service.user_assignments("user-8"))
    await journal.close()


async def test_a_slow_analytics_refresh_holds_no_flush_and_spaces_the_next(
    store: PostgresStore,
) -> None:
    # At millions of counters a refresh takes minutes (bench/RESULTS.md item 69). Flushes go on
    # while it runs, and the next refresh waits at least five times as long as it took.
    journal = PostgresJournal(store, flush_interval=0.01, analytics_interval=0.05)
    flushes = 0
    refreshes: list[int] = []  # flushes when each refresh began
    during: list[int] = []  # flushes while each refresh ran

    async def flush() -> None:
        nonlocal flushes
        await asyncio.sleep(0)
        flushes += 1

    async def slow_refresh() -> None:
        refreshes.append(flushes)
        await asyncio.sleep(0.2)
        during.append(flushes - refreshes[-1])

    journal.flush = flush  # type: ignore[method-assign]
    journal.refresh_analytics = slow_refresh  # type: ignore[method-assign]
    journal.start()
    try:
        # The first refresh is due after 0.05 s and takes 0.2 s; the next no sooner than 1 s
        # after it ended. Wait past the first's end and about half a second more.
        while len(during) < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
    finally:
        await journal.close()
    assert len(refreshes) == 1
    # Flushes every 0.01 s went on under the 0.2-s refresh (with it in the flush loop: none).
    assert during[0] >= 5


async def test_a_flush_reads_only_the_expired_tokens_it_deletes(
    store: PostgresStore, migrated_db: str
) -> None:
    # Each flush deletes the tokens older than a day, then claims its own. A process under load
    # flushes ten times a second: a day is 864,000 tokens, which the delete read in full, every
    # flush, until flushed_at was indexed (migration 014; bench/RESULTS.md item 66).
    conn = await asyncpg.connect(migrated_db)
    try:
        await conn.execute(
            "INSERT INTO write_behind_flushes (token, flushed_at)"
            " SELECT 'recent-' || g, now() - interval '1 hour' FROM generate_series(1, 100000) g"
        )
        await conn.execute(
            "INSERT INTO write_behind_flushes (token, flushed_at)"
            " SELECT 'expired-' || g, now() - interval '2 days' FROM generate_series(1, 3) g"
        )
        await conn.execute("ANALYZE write_behind_flushes")
        pages = await conn.fetchval(
            "SELECT relpages FROM pg_class WHERE relname = 'write_behind_flushes'"
        )
        # The claim as a flush runs it, executed: the pages each step touched (a node counts
        # its children's; the DELETE, a CTE, is an init plan the top node does not count).
        (plan,) = json.loads(
            await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + _CLAIM_FLUSH, "one")
        )
        touched = max(
            node["Shared Hit Blocks"] + node["Shared Read Blocks"] for node in _nodes(plan["Plan"])
        )
        assert await store.write_behind(WriteBehind("two", b"", [], {}, []))
        tokens = await conn.fetch("SELECT token FROM write_behind_flushes")
    finally:
        await conn.close()
    left = {r["token"] for r in tokens}
    assert len(left) == 100_002 and {"one", "two", "recent-1", "recent-100000"} <= left
    assert not any(t.startswith("expired-") for t in left)
    # Read whole, the table is hundreds of pages; the claim reads a few index and heap pages.
    assert pages > 500
    assert touched < 50, (touched, pages)


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)
