"""A large write-behind flush writes its assignments as blocks (`assignment_blocks`, migration 011;
compact since migration 016, and blocks stored before are read alike); exports and erasures
expand the blocks whose filter may hold the user first and find them as rows; a restart, and a
lookup of one user or id (out of the blocks whose filter may hold it), read them out of the
blocks without expanding them; the background expander empties them once flushes are small; past
the bound, flushes write rows."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import replace

import asyncpg
import pytest
from store_support import HELD_COLUMNS, as_row, assignment_rows, batch_request, batch_service

from allocsvc import server
from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.service import (
    AllocationRequest,
    AllocationService,
    Assignment,
    ConversionRequest,
    Limits,
)
from allocsvc.api import convert
from allocsvc.context import Extractor
from allocsvc.core import (
    Engine,
    assignment_block,
    decompress_block,
    filter_may_hold_id,
    filter_may_hold_user,
    key_hash,
)
from allocsvc.store import PostgresStore
from allocsvc.store.postgres import AssignmentBlock, AssignmentRow, WriteBehind, datetime_of_ms
from allocsvc.store.userdata import PostgresUserData
from allocsvc.store.writebehind import PostgresJournal

pytestmark = pytest.mark.integration

USERS = 300


async def _blocks(dsn: str) -> list[int]:
    """The rows of each block, oldest first."""
    conn = await asyncpg.connect(dsn)
    try:
        return [
            r["rows"] for r in await conn.fetch("SELECT rows FROM assignment_blocks ORDER BY id")
        ]
    finally:
        await conn.close()


async def _filters(store: PostgresStore) -> list[bytes]:
    """The filter of each block, oldest first."""
    rows = await store.pool.fetch("SELECT filter FROM assignment_blocks ORDER BY id")
    return [bytes(r["filter"]) for r in rows]


def _allocate(service: AllocationService, users: range) -> list[Assignment]:
    """One batch of `users` allocated (not flushed): their assignments."""
    prepared = service.prepare_batch(batch_request(users))
    assert prepared is not None
    service.finish_batch(prepared, "", {}, {})
    return [service.user_assignments(f"user-{i}")[0] for i in users]


async def _flushed(store: PostgresStore, *lots: range) -> list[list[Assignment]]:
    """Each lot of users allocated in one batch and flushed as a block of its own."""
    journal = PostgresJournal(store, block_min_rows=100)
    service = await batch_service(journal)
    made = []
    for users in lots:
        made.append(_allocate(service, users))
        await journal.flush()
    return made


async def _in_a_block(
    store: PostgresStore, dsn: str, form: str = "compact"
) -> tuple[AllocationService, list[Assignment]]:
    """A batch of USERS assignments flushed as one block; the assignments table empty. With
    `form` "copy", the block's payload is then stored as blocks were before migration 016: its
    COPY stream, compressed."""
    journal = PostgresJournal(store, block_min_rows=100)
    service = await batch_service(journal)
    held = _allocate(service, range(USERS))
    await journal.flush()
    assert journal.stats.blocks_written == 1
    assert journal.stats.unexpanded_assignments == USERS
    assert await _blocks(dsn) == [USERS]
    assert await assignment_rows(dsn, HELD_COLUMNS) == {}
    # The payload, compressed, reads as the rows' COPY stream.
    conn = await asyncpg.connect(dsn)
    try:
        payload = await conn.fetchval("SELECT payload FROM assignment_blocks")
    finally:
        await conn.close()
    stream = decompress_block(payload)
    assert len(payload) < len(stream)
    assert stream.startswith(b"PGCOPY\n\xff\r\n\0")
    with pytest.raises(ValueError, match="not an assignment block"):
        decompress_block(payload[:-10])
    if form == "copy":
        await store.pool.execute("UPDATE assignment_blocks SET payload = $1", _lz4_block(stream))
    return service, held


async def _by_id(store: PostgresStore, a: Assignment, _dsn: str) -> object:
    row = await store.get_assignment_by_id(a.id)
    assert row is not None
    return row.id


async def _latest(store: PostgresStore, a: Assignment, _dsn: str) -> object:
    row = await store.get_assignment(a.handle, a.user_id)
    assert row is not None
    return row.id


async def _restart(store: PostgresStore, a: Assignment, _dsn: str) -> object:
    restarted = AllocationService(Engine(), PostgresJournal(store), Extractor())
    loaded = await server.restore(PostgresJournal(store), restarted)
    assert loaded["assignments"] == USERS
    return restarted.user_assignments(a.user_id)[0].id


async def _export(store: PostgresStore, a: Assignment, _dsn: str) -> object:
    rows = await PostgresUserData(store, PostgresJournal(store)).export(a.user_id)
    (mine,) = rows["assignments"]
    return mine["id"]


async def _erase(store: PostgresStore, a: Assignment, dsn: str) -> object:
    removed = await PostgresUserData(store, PostgresJournal(store)).erase(a.user_id, "erased")
    assert removed["assignments"] == 1
    left = await assignment_rows(dsn, HELD_COLUMNS)
    assert len(left) == USERS - 1 and a.id not in left
    return a.id


Reader = Callable[[PostgresStore, Assignment, str], Awaitable[object]]


@pytest.mark.parametrize("form", ["compact", "copy"])
@pytest.mark.parametrize("read", [_by_id, _latest, _restart, _export, _erase])
async def test_every_reader_finds_assignments_of_a_block(
    store: PostgresStore, migrated_db: str, read: Reader, form: str
) -> None:
    _, held = await _in_a_block(store, migrated_db, form)
    one = held[7]
    assert await read(store, one, migrated_db) == one.id
    rows = await assignment_rows(migrated_db, HELD_COLUMNS)
    if read in (_by_id, _latest, _restart):
        # Read out of the block: it is left for the expander.
        assert await _blocks(migrated_db) == [USERS]
        assert rows == {}
        return
    assert await _blocks(migrated_db) == []
    for a in held:
        if a.id in rows:
            assert rows[a.id] == as_row(a)
    assert len(rows) == USERS - (read is _erase)


async def test_a_row_read_out_of_a_block_is_the_row_its_expansion_stores(
    store: PostgresStore, migrated_db: str
) -> None:
    _, held = await _in_a_block(store, migrated_db)
    single = held[11]
    from_block = (
        await store.get_assignment(single.handle, single.user_id),
        await store.get_assignment_by_id(single.id),
    )
    assert from_block[0] is not None and from_block[0] == from_block[1]
    assert await _blocks(migrated_db) == [USERS]
    assert await store.expand_all_blocks() == USERS
    from_table = (
        await store.get_assignment(single.handle, single.user_id),
        await store.get_assignment_by_id(single.id),
    )
    assert from_block == from_table
    assert await store.get_assignment_by_id("p-nothing") is None


async def test_a_block_another_connection_holds_is_skipped_or_waited_for(
    store: PostgresStore, migrated_db: str
) -> None:
    await _in_a_block(store, migrated_db)
    other = await asyncpg.connect(migrated_db)
    try:
        lock = other.transaction()
        await lock.start()
        await other.fetch("SELECT id FROM assignment_blocks FOR UPDATE")
        assert await store.expand_blocks() == 0  # the background expander skips it
        waiting = asyncio.create_task(store.expand_blocks(wait=True))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await lock.rollback()
        assert await waiting == USERS
    finally:
        await other.close()
    assert len(await assignment_rows(migrated_db, HELD_COLUMNS)) == USERS
    assert await store.unexpanded_assignments() == 0


async def test_a_reader_expands_the_blocks_written_before_it_only(
    store: PostgresStore, migrated_db: str
) -> None:
    journal = PostgresJournal(store, block_min_rows=100)
    service = await batch_service(journal)
    for first in (0, USERS):
        _allocate(service, range(first, first + USERS))
        await journal.flush()
    conn = await asyncpg.connect(migrated_db)
    try:
        first_block, _ = [
            r["id"] for r in await conn.fetch("SELECT id FROM assignment_blocks ORDER BY id")
        ]
    finally:
        await conn.close()
    assert await store.expand_blocks(wait=True, through=first_block) == USERS
    assert await _blocks(migrated_db) == [USERS]
    assert await store.expand_all_blocks() == USERS
    assert await store.expand_all_blocks() == 0
    assert len(await assignment_rows(migrated_db, HELD_COLUMNS)) == 2 * USERS


async def test_rows_of_a_block_written_already_are_kept_once(
    store: PostgresStore, migrated_db: str
) -> None:
    journal = PostgresJournal(store, block_min_rows=100)
    held = _allocate(await batch_service(journal), range(USERS))
    unit = journal._take()
    assert unit is not None
    # The same assignments as rows, then as a block of another flush (another token).
    assert await store.write_behind(unit.write())
    assert await store.write_behind(replace(unit.write(block=True), token="another"))
    assert await _blocks(migrated_db) == [USERS]
    assert await store.expand_blocks() == USERS
    rows = await assignment_rows(migrated_db, HELD_COLUMNS)
    assert rows == {a.id: as_row(a) for a in held}


async def test_past_the_bound_a_flush_writes_rows(store: PostgresStore, migrated_db: str) -> None:
    journal = PostgresJournal(store, block_min_rows=100, max_unexpanded_assignments=USERS + 50)
    service = await batch_service(journal)
    _allocate(service, range(USERS))
    await journal.flush()
    _allocate(service, range(USERS, 2 * USERS))
    await journal.flush()
    assert await _blocks(migrated_db) == [USERS]
    assert len(await assignment_rows(migrated_db, HELD_COLUMNS)) == USERS
    assert journal.stats.blocks_written == 1
    # Below `block_min_rows`, rows too.
    _allocate(service, range(2 * USERS, 2 * USERS + 99))
    await journal.flush()
    assert journal.stats.blocks_written == 1
    assert await _blocks(migrated_db) == [USERS]


async def test_the_bound_is_logged_once_when_reached_and_when_blocks_come_back(
    store: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    journal = PostgresJournal(
        store,
        block_min_rows=100,
        max_unexpanded_assignments=USERS + 50,
        flush_interval=0.01,
        block_quiet_s=0.0,
    )
    service = await batch_service(journal)
    caplog.set_level(logging.INFO, logger="allocsvc.store.writebehind")

    def said(text: str) -> list[str]:
        return [r.levelname for r in caplog.records if text in r.getMessage()]

    for lot in range(3):  # a block, then two flushes the bound turns into rows
        _allocate(service, range(lot * USERS, (lot + 1) * USERS))
        await journal.flush()
    assert journal.stats.blocks_written == 1
    assert said("at max_unexpanded_assignments") == ["WARNING"]
    journal.start()
    try:
        for _ in range(1000):  # the expander empties the block: flushes were rows
            if journal.stats.assignments_expanded == USERS:
                break
            await asyncio.sleep(0.01)
        _allocate(service, range(3 * USERS, 4 * USERS))
        for _ in range(1000):
            if journal.stats.blocks_written == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await journal.close()
    assert journal.stats.blocks_written == 2
    assert said("at max_unexpanded_assignments") == ["WARNING"]
    assert said("large flushes write blocks again") == ["INFO"]


async def test_the_expander_empties_blocks_once_flushes_are_small(
    store: PostgresStore, migrated_db: str
) -> None:
    journal = PostgresJournal(store, block_min_rows=100, flush_interval=0.01)
    service = await batch_service(journal)
    _allocate(service, range(2 * USERS))
    journal.start()
    try:
        for _ in range(500):
            if journal.stats.assignments_expanded == 2 * USERS:
                break
            await asyncio.sleep(0.02)
    finally:
        await journal.close()
    # One flush, one block, expanded by the loop after a flush of nothing.
    assert journal.stats.blocks_written == 1
    assert journal.stats.assignments_expanded == 2 * USERS
    assert journal.stats.unexpanded_assignments == 0
    assert await _blocks(migrated_db) == []
    assert len(await assignment_rows(migrated_db, HELD_COLUMNS)) == 2 * USERS


async def _expanding(journal: PostgresJournal, done: Callable[[], bool]) -> None:
    """Run `journal`'s loops until `done()` (a hang bound of 10 s), then 20 more of its flush
    intervals of 10 ms."""
    journal.start()
    try:
        for _ in range(1000):
            if done():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
    finally:
        await journal.close()


async def _looks_and_leaves_it(journal: PostgresJournal, dsn: str) -> None:
    """`journal`'s expander finds the one block of USERS assignments and leaves it."""
    await _expanding(journal, lambda: journal.stats.unexpanded_assignments == USERS)
    assert journal.stats.unexpanded_assignments == USERS
    assert journal.stats.assignments_expanded == 0
    assert await _blocks(dsn) == [USERS]


async def test_no_block_is_expanded_while_some_process_writes_blocks(
    store: PostgresStore, migrated_db: str
) -> None:
    # A replica with no batches of its own leaves the block another one wrote just now (that
    # one's batches are past what rows take), and expands it once blocks stop coming.
    writer = PostgresJournal(store, block_min_rows=100)
    _allocate(await batch_service(writer), range(USERS))
    await writer.flush()
    assert writer.stats.blocks_written == 1
    await _looks_and_leaves_it(
        PostgresJournal(store, flush_interval=0.01, block_quiet_s=3600), migrated_db
    )
    # At a minute between flushes (`write_behind_interval`) the expander still looks every
    # tenth of a second, and leaves the block however short `block_quiet_s`: under load
    # blocks come one a flush interval, so it waits two.
    await _looks_and_leaves_it(
        PostgresJournal(store, flush_interval=60, block_quiet_s=0.0), migrated_db
    )
    later = PostgresJournal(store, flush_interval=0.01, block_quiet_s=0.0)
    await _expanding(later, lambda: later.stats.assignments_expanded == USERS)
    assert later.stats.assignments_expanded == USERS
    assert await _blocks(migrated_db) == []
    assert len(await assignment_rows(migrated_db, HELD_COLUMNS)) == USERS


async def test_the_latest_is_the_one_made_last_though_an_older_one_was_in_a_block(
    store: PostgresStore, migrated_db: str
) -> None:
    # A row takes the time its assignment was made, not the time it was written: the block's
    # rows are written after the newer assignment's row.
    journal = PostgresJournal(store, block_min_rows=100)
    service = await batch_service(journal)
    older = _allocate(service, range(USERS))[7]
    await journal.flush()
    await asyncio.sleep(0.01)
    _allocate(service, range(7, 8))
    first, newer = service.user_assignments(older.user_id)  # oldest first
    assert first == older and newer.created_ms > older.created_ms
    await journal.flush()
    assert await _blocks(migrated_db) == [USERS]
    latest = await store.get_assignment(older.handle, older.user_id)
    assert latest is not None and latest.id == newer.id
    assert await store.expand_all_blocks() == USERS
    rows = await assignment_rows(migrated_db, HELD_COLUMNS)
    assert (rows[older.id], rows[newer.id]) == (as_row(older), as_row(newer))


def _without_last_column(stream: bytes) -> bytes:
    """A binary COPY stream with the last field of every row left out."""
    out, at = bytearray(stream[:19]), 19
    while (fields := struct.unpack_from(">h", stream, at)[0]) != -1:
        out += struct.pack(">h", fields - 1)
        start = at = at + 2
        for field in range(fields):
            if field == fields - 1:
                out += stream[start:at]
            (size,) = struct.unpack_from(">i", stream, at)
            at += 4 + max(size, 0)
    return bytes(out + stream[at:])


def _lz4_block(data: bytes) -> bytes:
    """`data` as an LZ4 block of literals only, its length in front (`decompress_block`'s
    format)."""
    rest, token = len(data) - 15, 0xF0
    if rest < 0:
        token, extra = len(data) << 4, b""
    else:
        extra = b"\xff" * (rest // 255) + bytes([rest % 255])
    return struct.pack("<I", len(data)) + bytes([token]) + extra + data


async def test_a_block_stored_without_creation_times_is_expanded(
    store: PostgresStore, migrated_db: str
) -> None:
    # Blocks stored before rows carried `created_at`: their rows take the time of expansion.
    _, held = await _in_a_block(store, migrated_db)
    payload = await store.pool.fetchval("SELECT payload FROM assignment_blocks")
    old = _without_last_column(decompress_block(payload))
    assert decompress_block(_lz4_block(old)) == old
    await store.pool.execute("UPDATE assignment_blocks SET payload = $1", _lz4_block(old))
    # Read out of the block, a row takes the time the block was written.
    written = await store.pool.fetchval("SELECT created_at FROM assignment_blocks")
    row = await store.get_assignment_by_id(held[3].id)
    assert row is not None and row.created_at == written
    fields = (row.id, row.experiment_id, row.user_id, row.variant, row.segment_key)
    assert fields == as_row(held[3])[:5]
    before = await store.pool.fetchval("SELECT now()")
    assert await store.expand_all_blocks() == USERS
    rows = await assignment_rows(migrated_db, HELD_COLUMNS)
    assert {i: r[:-1] for i, r in rows.items()} == {a.id: as_row(a)[:-1] for a in held}
    expanded_at = [r[-1] for r in rows.values()]
    assert all(isinstance(t, int) and t >= before.timestamp() * 1000 - 1 for t in expanded_at)


async def test_a_lookup_reads_only_the_blocks_that_may_hold_it(
    store: PostgresStore, migrated_db: str
) -> None:
    journal = PostgresJournal(store, block_min_rows=100)
    service = await batch_service(journal)
    first = _allocate(service, range(USERS))
    await journal.flush()
    # One assignment of the Python path in the second block too.
    single = await service.allocate(
        convert.allocate_request(pb.AllocateRequest(experiment_id="one", user_id="solo"))
    )
    second = [*_allocate(service, range(USERS, 2 * USERS)), single.assignment]
    await journal.flush()
    assert await _blocks(migrated_db) == [USERS, USERS + 1]
    filters = await _filters(store)
    for f, held in zip(filters, (first, second), strict=True):
        assert all(filter_may_hold_user(f, a.handle, a.user_id) for a in held)
        assert all(filter_may_hold_id(f, a.id) for a in held)
    ids = [r["id"] for r in await store.pool.fetch("SELECT id FROM assignment_blocks ORDER BY id")]
    payloads = [
        r["payload"] for r in await store.pool.fetch("SELECT payload FROM assignment_blocks")
    ]

    async def damage(block: int | None) -> None:
        """Every block's payload as written but `block`'s, which no lookup can read."""
        for i, payload in zip(ids, payloads, strict=True):
            await store.pool.execute(
                "UPDATE assignment_blocks SET payload = $2 WHERE id = $1",
                i,
                b"\0" if i == block else payload,
            )

    # A user in neither block (one whose key neither filter passes: a few in 10,000 others do)
    # is looked up without reading either.
    handle = first[0].handle
    absent = next(
        u
        for u in (f"new-{i}" for i in range(1000))
        if not any(filter_may_hold_user(f, handle, u) for f in filters)
    )
    for block in ids:
        await damage(block)
        assert await store.get_assignment(handle, absent) is None
    # A user or id of one block: the other is not read (unless its filter passes too).
    for block, (mine, other) in enumerate(((second, filters[0]), (first, filters[1]))):
        await damage(ids[block])
        one = next(a for a in mine if not filter_may_hold_user(other, a.handle, a.user_id))
        row = await store.get_assignment(one.handle, one.user_id)
        assert row is not None and row.id == one.id
        one = next(a for a in mine if not filter_may_hold_id(other, a.id))
        row = await store.get_assignment_by_id(one.id)
        assert row is not None and row.id == one.id
    # A damaged block is read for its own users: the lookup fails.
    await damage(ids[0])
    with pytest.raises(ValueError, match="not an assignment block"):
        await store.get_assignment(first[0].handle, first[0].user_id)
    await damage(None)
    row = await store.get_assignment_by_id(single.assignment.id)
    assert row is not None and row.user_id == "solo"
    assert await _blocks(migrated_db) == [USERS, USERS + 1]
    assert await assignment_rows(migrated_db, HELD_COLUMNS) == {}


async def test_the_latest_is_read_out_of_a_block_when_it_was_made_last(
    store: PostgresStore, migrated_db: str
) -> None:
    journal = PostgresJournal(store, block_min_rows=100)
    service = await batch_service(journal)
    older = _allocate(service, range(7, 8))[0]
    await journal.flush()  # a row
    await asyncio.sleep(0.01)
    _allocate(service, range(USERS))
    first, newer = service.user_assignments(older.user_id)  # oldest first
    assert first == older and newer.created_ms > older.created_ms
    await journal.flush()  # a block
    assert await _blocks(migrated_db) == [USERS]
    assert set(await assignment_rows(migrated_db, HELD_COLUMNS)) == {older.id}
    latest = await store.get_assignment(older.handle, older.user_id)
    assert latest is not None and latest.id == newer.id
    # Several users in one lookup: each one's latest, wherever it is; users without one (and
    # repeats) left out.
    others = [a for a in service.user_assignments("user-3") if a.handle == older.handle]
    users = [older.user_id, "user-3", "nobody", older.user_id]
    found = await store.get_latest_assignments(older.handle, users)
    assert {u: r.id for u, r in found.items()} == {
        older.user_id: newer.id,
        "user-3": others[-1].id,
    }
    # Several ids in one lookup, the same way: a row's and a block row's.
    by_id = await store.get_assignments_by_ids([older.id, newer.id, "p-nothing", older.id])
    assert {i: (r.user_id, r.variant) for i, r in by_id.items()} == {
        older.id: (older.user_id, older.variant),
        newer.id: (newer.user_id, newer.variant),
    }


async def test_concurrent_lookups_are_answered_in_rounds(
    store: PostgresStore, migrated_db: str
) -> None:
    """Lookups made while one is under way go to PostgreSQL together, one call per
    experiment (or for ids) per round, and each caller gets its own users' or id's."""
    journal = PostgresJournal(store, block_min_rows=100)
    service = await batch_service(journal)
    held = _allocate(service, range(USERS))
    await journal.flush()
    assert await _blocks(migrated_db) == [USERS]
    # The batch's users are in two experiments: one call for each per round.
    by_handle = {a.handle: service.experiment_by_handle(a.handle) for a in held}
    assert len(by_handle) == 2
    users, ids = held[:40], held[40:80]
    found = await asyncio.gather(
        *(journal.stored_latest(by_handle[a.handle], [a.user_id, "nobody"]) for a in users),
        *(journal.stored_assignment(a.id, by_handle) for a in ids),
        journal.stored_assignment("p-nothing", by_handle),
    )
    assert found[: len(users)] == [{a.user_id: a} for a in users]
    assert found[len(users) :] == [*ids, None]
    # The first lookup of each kind starts a round at once, the rest wait for one more.
    assert journal.lookup_rounds <= 4


@pytest.mark.parametrize("in_block", ["p-100", "p-ff"])
async def test_of_a_row_and_a_block_row_made_in_one_millisecond_the_later_id_is_the_latest(
    store: PostgresStore, migrated_db: str, in_block: str
) -> None:
    # As `_NEWEST_FIRST` orders rows: by length of id, then id (own ids are unpadded hex).
    made_ms, handle = 1_790_000_000_123, 5
    in_table = "p-ff" if in_block == "p-100" else "p-100"
    await store.insert_assignments(
        [
            AssignmentRow(
                id=in_table,
                experiment_id=handle,
                user_id="ann",
                variant=0,
                segment_key="",
                segment_hash=key_hash(""),
                propensity=0.5,
                created_at=datetime_of_ms(made_ms),
            )
        ]
    )
    single = (in_block, "one", handle, "ann", 1, "", 0, 0.5, made_ms)
    block = AssignmentBlock(1, *assignment_block([], [single]))
    assert await store.write_behind(WriteBehind("tie", b"", [], {}, [], blocks=[block]))
    latest = await store.get_assignment(handle, "ann")
    assert latest is not None and latest.id == "p-100"
    assert await store.expand_all_blocks() == 1
    assert await store.get_assignment(handle, "ann") == latest


async def test_a_block_without_a_filter_is_expanded_for_any_lookup(
    store: PostgresStore, migrated_db: str
) -> None:
    _, held = await _in_a_block(store, migrated_db)
    await store.pool.execute("UPDATE assignment_blocks SET filter = NULL")
    assert await store.get_assignment(held[0].handle, "nobody") is None
    assert await _blocks(migrated_db) == []
    assert len(await assignment_rows(migrated_db, HELD_COLUMNS)) == USERS


async def test_a_large_flush_is_split_into_blocks_of_whole_batches(
    store: PostgresStore, migrated_db: str
) -> None:
    # Smaller blocks: a lookup of a user in one reads that block alone.
    journal = PostgresJournal(store, block_min_rows=100, block_max_rows=250)
    service = await batch_service(journal)
    single = await service.allocate(
        convert.allocate_request(pb.AllocateRequest(experiment_id="one", user_id="solo"))
    )
    held = [single.assignment]
    for first in (0, 100, 200):
        held += _allocate(service, range(first, first + 100))
    await journal.flush()
    # The single with two batches, then the third batch: a batch is not split.
    assert await _blocks(migrated_db) == [201, 100]
    assert journal.stats.blocks_written == 2
    first_filter, _ = await _filters(store)
    # A user of the third batch whom the first block's filter does not pass (nearly all).
    one = next(
        a for a in held[-100:] if not filter_may_hold_user(first_filter, a.handle, a.user_id)
    )
    row = await store.get_assignment(one.handle, one.user_id)
    assert row is not None and row.id == one.id
    assert await store.expand_all_blocks() == 301
    rows = await assignment_rows(migrated_db, HELD_COLUMNS)
    assert rows == {a.id: as_row(a) for a in held}


async def _restarted(
    store: PostgresStore, limits: Limits | None = None
) -> tuple[AllocationService, dict[str, int], PostgresJournal]:
    """A service restored from `store`, and its journal (started: it answers conversions)."""
    journal = PostgresJournal(store)
    restarted = AllocationService(Engine(), journal, Extractor(), limits)
    loaded = await server.restore(journal, restarted)
    journal.start()
    return restarted, loaded, journal


def _latest_held(service: AllocationService, a: Assignment) -> Assignment | None:
    return service._latest_of((a.handle, a.user_id))


async def test_a_restart_holds_the_newest_of_a_row_and_a_block_row_either_way(
    store: PostgresStore, migrated_db: str
) -> None:
    journal = PostgresJournal(store, block_min_rows=100)
    service = await batch_service(journal)
    # user-7: a row, then (newer) in a block; user-8: in the block, then (newer) a row.
    (older_7,) = _allocate(service, range(7, 8))
    await journal.flush()
    await asyncio.sleep(0.01)
    _allocate(service, range(USERS))
    await journal.flush()
    await asyncio.sleep(0.01)
    _allocate(service, range(8, 9))
    await journal.flush()
    # Each user's assignment in the block: user-7's newest, the others' oldest.
    in_block = [service.user_assignments(f"user-{i}")[-(i == 7)] for i in range(USERS)]
    (_, newer_7), (older_8, newer_8) = (service.user_assignments(u) for u in ("user-7", "user-8"))
    assert await _blocks(migrated_db) == [USERS]
    assert set(await assignment_rows(migrated_db, HELD_COLUMNS)) == {older_7.id, newer_8.id}

    restarted, loaded, journal = await _restarted(store)
    # The block is read, not expanded; of its rows all but user-8's older one are held.
    assert (loaded["blocks"], loaded["block_assignments"]) == (1, USERS)
    assert loaded["assignments"] == 2 + USERS - 1
    assert await _blocks(migrated_db) == [USERS]
    assert _latest_held(restarted, newer_7) == newer_7
    assert _latest_held(restarted, newer_8) == newer_8
    assert all(_latest_held(restarted, a) == a for a in in_block if a.user_id != "user-8")
    # The one left in the block is found there by id.
    (converted,) = await restarted.record_conversions([ConversionRequest(assignment_id=older_8.id)])
    assert not isinstance(converted, Exception) and converted.assignment == older_8
    await journal.close()


async def test_a_bounded_restart_from_a_block_keeps_every_sticky_user_s_assignment(
    store: PostgresStore, migrated_db: str
) -> None:
    journal = PostgresJournal(store, block_min_rows=100)
    service = await batch_service(journal, (("one", True), ("two", True)))
    made = _allocate(service, range(USERS))
    await journal.flush()
    assert await _blocks(migrated_db) == [USERS]
    bound = USERS // 6
    restarted, loaded, journal = await _restarted(store, Limits(max_held_assignments=bound))
    assert loaded["block_assignments"] == USERS and len(restarted._held) == bound
    # The newest `bound` are held; every other user is looked up (through the block's filter)
    # and keeps the assignment it had.
    again = [await restarted.allocate(AllocationRequest(a.experiment_key, a.user_id)) for a in made]
    assert all(r.sticky for r in again)
    assert [r.assignment.id for r in again] == [a.id for a in made]
    await journal.close()


async def test_a_snapshot_reads_a_block_expanded_meanwhile_once(
    store: PostgresStore, migrated_db: str
) -> None:
    _, held = await _in_a_block(store, migrated_db)
    taken: list[int] = []

    def take(payload: bytes, made_ms: int) -> tuple[int, int]:
        taken.append(len(decompress_block(payload)))
        return USERS, 0

    rows: list[bytes] = []

    async def output(data: bytes | bytearray) -> None:
        rows.append(bytes(data))

    async with store.snapshot() as connection:
        await connection.fetchval("SELECT 1")  # the snapshot is taken at its first query
        # Another connection expands the block now: the snapshot still sees it, not its rows.
        assert await store.expand_all_blocks() == USERS
        assert await store.read_blocks(connection, take) == (1, USERS, 0)
        await store.copy_out_assignments(held[0].handle, output, connection=connection)
    assert len(taken) == 1
    copied = b"".join(rows)
    assert held[0].id.encode() not in copied and len(await _blocks(migrated_db)) == 0


async def test_an_export_or_erasure_expands_only_the_blocks_that_may_hold_the_user(
    store: PostgresStore, migrated_db: str
) -> None:
    first, second = await _flushed(store, range(USERS), range(USERS, 2 * USERS))
    assert await _blocks(migrated_db) == [USERS, USERS]
    # A user in no block expands none.
    assert await store.expand_blocks_of_user("nobody") == 0
    assert await _blocks(migrated_db) == [USERS, USERS]
    data = PostgresUserData(store, PostgresJournal(store))
    # A user of the second block: that block is expanded, the first is left.
    exported = await data.export(second[50].user_id)
    assert [r["id"] for r in exported["assignments"]] == [second[50].id]
    assert await _blocks(migrated_db) == [USERS]
    assert set(await assignment_rows(migrated_db, HELD_COLUMNS)) == {a.id for a in second}
    # A user of the first: now that one.
    removed = await data.erase(first[7].user_id, "erased")
    assert removed["assignments"] == 1
    assert await _blocks(migrated_db) == []
    rows = await assignment_rows(migrated_db, HELD_COLUMNS)
    assert set(rows) == {a.id for a in first + second} - {first[7].id}
