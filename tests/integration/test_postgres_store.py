"""PostgresStore round trips, batched counters, exactly-once conversions, embedded server."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from allocsvc.core import RESTORE_COPY_COLUMNS
from allocsvc.store import (
    AssignmentRow,
    ConflictError,
    ConversionRow,
    EmbeddedPostgres,
    ExperimentRow,
    NotFoundError,
    PostgresStore,
    SegmentationConfigRow,
    SegmentRow,
    VariantRow,
    migrate,
    to_signed64,
    to_unsigned64,
)
from allocsvc.store import postgres as postgres_module
from allocsvc.store.writebehind import PostgresJournal

pytestmark = pytest.mark.integration

EDGE_HASHES = [0, 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
VARIANTS = [VariantRow(0, "blue"), VariantRow(1, "green"), VariantRow(2, "red")]


@pytest.fixture
async def store(migrated_db: str) -> AsyncIterator[PostgresStore]:
    async with await PostgresStore.connect(migrated_db, min_size=1, max_size=12) as s:
        yield s


async def new_experiment(store: PostgresStore, key: str = "checkout-button") -> int:
    row = await store.insert_experiment(
        ExperimentRow(
            key=key,
            name="Checkout button",
            status="running",
            variants=VARIANTS,
        )
    )
    assert row.id is not None
    return row.id


@pytest.mark.parametrize(
    ("unsigned", "signed"),
    [(0, 0), (2**63 - 1, 2**63 - 1), (2**63, -(2**63)), (2**64 - 1, -1), (2**64 - 2, -2)],
)
def test_hash_sign_conversion_edges(unsigned: int, signed: int) -> None:
    assert to_signed64(unsigned) == signed
    assert to_unsigned64(signed) == unsigned


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_to_signed64_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        to_signed64(bad)


@pytest.mark.parametrize("bad", [-(2**63) - 1, 2**63])
def test_to_unsigned64_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="signed 64-bit"):
        to_unsigned64(bad)


async def test_experiment_round_trip(store: PostgresStore) -> None:
    inserted = await store.insert_experiment(
        ExperimentRow(
            key="checkout-button",
            name="Checkout button",
            description="colour of the pay button",
            policy="fixed",
            config={"hierarchy": {"levels": ["country", "device"]}, "exploration": "aggressive"},
            sticky=False,
            variants=[
                VariantRow(1, "green", "Green", 0.25, {"color": "#0f0"}),
                VariantRow(0, "blue", "Blue", 0.75, {"color": "#00f", "sizes": [1, 2]}),
            ],
        )
    )
    assert inserted.id is not None
    assert inserted.status == "draft"
    assert inserted.created_at is not None
    assert [v.key for v in inserted.variants] == ["blue", "green"]

    assert await store.get_experiment("checkout-button") == inserted
    assert await store.get_experiment_by_id(inserted.id) == inserted
    assert await store.get_experiment("nope") is None
    assert await store.get_experiment_by_id(inserted.id + 1000) is None

    other = await store.insert_experiment(ExperimentRow(key="banner", status="running"))
    assert other.variants == []
    assert [e.key for e in await store.list_experiments()] == ["checkout-button", "banner"]
    assert [e.key for e in await store.list_experiments(["running", "paused"])] == ["banner"]
    assert await store.list_experiments([]) == []


async def test_experiment_update(store: PostgresStore) -> None:
    eid = await new_experiment(store)
    current = await store.get_experiment("checkout-button")
    assert current is not None
    changed = ExperimentRow(
        key=current.key,
        name="Renamed",
        description=current.description,
        status="paused",
        policy="uniform",
        config={"segmentation": {"mode": "manual"}},
        sticky=current.sticky,
        # keys swapped between indexes, one variant dropped, one weight set
        variants=[VariantRow(0, "green"), VariantRow(1, "blue", weight=2.0)],
    )
    updated = await store.update_experiment(changed)
    assert updated.id == eid
    assert updated.updated_at is not None and current.updated_at is not None
    assert updated.updated_at >= current.updated_at
    assert await store.get_experiment("checkout-button") == updated
    assert [(v.index, v.key, v.weight) for v in updated.variants] == [
        (0, "green", None),
        (1, "blue", 2.0),
    ]

    with pytest.raises(NotFoundError):
        await store.update_experiment(ExperimentRow(key="missing"))


async def test_duplicate_keys_conflict(store: PostgresStore) -> None:
    await new_experiment(store)
    with pytest.raises(ConflictError, match="checkout-button"):
        await new_experiment(store)
    with pytest.raises(ConflictError):
        await store.insert_experiment(
            ExperimentRow(key="dup-variants", variants=[VariantRow(0, "a"), VariantRow(1, "a")])
        )
    # the failed insert left nothing behind
    assert await store.get_experiment("dup-variants") is None


async def test_invalid_status_is_rejected_by_the_schema(store: PostgresStore) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await store.insert_experiment(ExperimentRow(key="x", status="live"))


async def test_segmentation_config_round_trip(store: PostgresStore) -> None:
    eid = await new_experiment(store)
    assert await store.get_segmentation_config(eid) is None
    first = await store.upsert_segmentation_config(
        SegmentationConfigRow(eid, mode="manual", segment_by=["country", "device"])
    )
    assert first.min_samples_per_segment == 100
    assert await store.get_segmentation_config(eid) == first
    second = await store.upsert_segmentation_config(
        SegmentationConfigRow(eid, mode="auto", auto_activation=True, auto_activation_threshold=50)
    )
    assert (second.mode, second.segment_by, second.auto_activation_threshold) == ("auto", [], 50)
    assert await store.get_segmentation_config(eid) == second


async def test_count_deltas_accumulate_with_edge_hashes(store: PostgresStore) -> None:
    eid = await new_experiment(store)
    await store.apply_count_deltas([])
    batch = [(eid, h, 1, 10, 2, 1.5) for h in EDGE_HASHES]
    await store.apply_count_deltas(batch)
    # the same key twice in one batch is summed, not an error
    await store.apply_count_deltas([*batch, (eid, 2**64 - 1, 1, 5, 1, 0.25)])
    counts = await store.load_counts()
    assert counts == sorted(
        [(eid, h, 1, 20, 4, 3.0) for h in EDGE_HASHES if h != 2**64 - 1]
        + [(eid, 2**64 - 1, 1, 25, 5, 3.25)],
        key=lambda r: (r[0], to_signed64(r[1]), r[2]),
    )
    assert await store.load_counts(eid + 1) == []
    assert len(await store.load_counts(eid)) == len(EDGE_HASHES)

    with pytest.raises(ValueError, match="unsigned 64-bit"):
        await store.apply_count_deltas([(eid, 2**64, 0, 1, 0, 0.0)])


async def test_concurrent_count_deltas_lose_nothing(store: PostgresStore) -> None:
    eid = await new_experiment(store)
    hashes = [3, 2**63 + 7, 2**64 - 1]

    async def writer(i: int) -> None:
        for _ in range(10):
            # different orders in different writers, same rows
            rows = [(eid, h, v, 1, i % 2, 0.5) for h in hashes for v in (0, 1, 2)]
            await store.apply_count_deltas(rows if i % 2 else rows[::-1])

    await asyncio.gather(*(writer(i) for i in range(10)))
    counts = await store.load_counts(eid)
    assert len(counts) == 9
    assert {(a, c, s) for *_, a, c, s in counts} == {(100, 50, 50.0)}


async def test_assignments_round_trip_and_stickiness(store: PostgresStore) -> None:
    eid = await new_experiment(store)
    first = AssignmentRow(
        id="a-1",
        experiment_id=eid,
        user_id="user-1",
        variant=2,
        segment_key="country:us|device:mobile",
        segment_hash=2**64 - 1,
        cascade_level=1,
        propensity=0.4,
        context={"channel": "web", "pages_viewed": 3},
        region="us-east",
    )
    second = AssignmentRow("a-2", eid, "user-2", 0, "", 0)
    assert await store.insert_assignments([]) == 0
    assert await store.insert_assignments([first, second]) == 2
    # a replayed id is ignored; a new assignment of the same user (non-sticky) is kept
    # and is the one the (experiment, user) lookup returns
    again = AssignmentRow("a-3", eid, "user-1", 1, "", 5)
    assert await store.insert_assignments([again, first]) == 1

    latest = await store.get_assignment(eid, "user-1")
    assert latest is not None and latest.id == "a-3"
    got = await store.get_assignment_by_id("a-1")
    assert got is not None
    assert got.created_at is not None
    assert got == dataclasses.replace(first, created_at=got.created_at)
    assert await store.get_assignment_by_id("a-2") is not None
    assert await store.get_assignment(eid, "user-3") is None
    assert [r[0] for r in await copied(store, eid)] == ["a-1", "a-2", "a-3"]


async def test_of_assignments_made_in_one_millisecond_the_later_id_is_the_latest(
    store: PostgresStore,
) -> None:
    # A batch's assignments share their millisecond, and own ids are `{prefix}-{seq:x}`, hex
    # without padding: as text `p-ff` sorts after `p-100`, made after it.
    eid = await new_experiment(store)
    at = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    ids = ["p-fe", "p-ff", "p-100"]
    rows = [AssignmentRow(i, eid, "user-1", v, "", 0, created_at=at) for v, i in enumerate(ids)]
    assert await store.insert_assignments(rows) == 3
    latest = await store.get_assignment(eid, "user-1")
    assert latest is not None and latest.id == "p-100"
    assert [r[0] for r in await copied(store, eid)] == ids
    assert [r[0] for r in await copied(store, eid, newest=2)] == ids[1:]


async def copied(
    store: PostgresStore, eid: int, newest: int | None = None
) -> list[tuple[Any, ...]]:
    """The rows of `copy_out_assignments`' binary COPY stream, decoded here (in Python, apart from
    the Rust reader the server uses): (id, user, variant, key, level, propensity, created_at
    in PostgreSQL's microseconds)."""
    pieces: list[bytearray] = []

    async def output(data: bytearray) -> None:
        pieces.append(data)

    await store.copy_out_assignments(eid, output, newest=newest)
    data = b"".join(pieces)
    assert data[:11] == b"PGCOPY\n\xff\r\n\0"
    at = 19 + struct.unpack_from(">i", data, 15)[0]
    rows = []
    while (count := struct.unpack_from(">h", data, at)[0]) != -1:
        assert count == len(RESTORE_COPY_COLUMNS)
        at += 2
        fields: list[bytes | None] = []
        for _ in range(count):
            (size,) = struct.unpack_from(">i", data, at)
            at += 4
            fields.append(None if size < 0 else data[at : at + size])
            at += max(size, 0)
        ident, user, variant, key, level, propensity, created = fields
        assert ident and user and variant and key is not None and level and created
        rows.append(
            (
                ident.decode(),
                user.decode(),
                struct.unpack(">h", variant)[0],
                key.decode(),
                struct.unpack(">h", level)[0],
                None if propensity is None else struct.unpack(">d", propensity)[0],
                struct.unpack(">q", created)[0],
            )
        )
    assert at + 2 == len(data)
    return rows


async def test_assignments_copy_oldest_first_and_newest_only(store: PostgresStore) -> None:
    eid = await new_experiment(store)
    rows = [
        AssignmentRow(f"a-{i:02}", eid, f"user-{i}", i % 3, f"k:{i % 2}", 0, i % 2, 0.5)
        for i in range(25)
    ]
    rows[3] = dataclasses.replace(rows[3], propensity=None)
    assert await store.insert_assignments(rows) == 25
    # All of them, oldest first (one insert: the same time, then by id), every column.
    every = await copied(store, eid)
    assert [r[:6] for r in every] == [
        (r.id, r.user_id, r.variant, r.segment_key, r.cascade_level, r.propensity) for r in rows
    ]
    stored = await store.get_assignment_by_id("a-00")
    assert stored is not None and stored.created_at is not None
    since_2000 = stored.created_at - datetime(2000, 1, 1, tzinfo=UTC)
    assert {r[6] for r in every} == {since_2000 // timedelta(microseconds=1)}
    # Only the newest 7, still oldest first.
    assert [r[0] for r in await copied(store, eid, newest=7)] == [r.id for r in rows[-7:]]
    assert await copied(store, 10**9) == []


PATH = [3244421341483603138, 2**64 - 5, 2**63]  # global, level 1, level 2


def conversion(
    eid: int, key: str = "", assignment: str = "a-1", value: float = 2.5
) -> ConversionRow:
    return ConversionRow(
        assignment_id=assignment,
        experiment_id=eid,
        variant=1,
        path_hashes=PATH,
        value=value,
        idempotency_key=key,
        segment_key="country:us|device:mobile",
        user_id="user-1",
    )


async def test_conversion_is_counted_once_per_idempotency_key(store: PostgresStore) -> None:
    eid = await new_experiment(store)
    assert await store.insert_conversions([]) == []
    assert await store.insert_conversions([conversion(eid, "k1")]) == [True]
    assert await store.insert_conversions([conversion(eid, "k1", value=99.0)]) == [False]
    # within one batch: first occurrence wins; other keys and assignments are separate
    assert await store.insert_conversions(
        [
            conversion(eid, "k2"),
            conversion(eid, "k2"),
            conversion(eid, "k1"),
            conversion(eid, "k1", assignment="a-2"),
        ]
    ) == [True, False, False, True]

    counts = await store.load_counts(eid)
    assert counts == sorted([(eid, h, 1, 0, 3, 7.5) for h in PATH], key=lambda r: to_signed64(r[1]))
    async with store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM conversions") == 3
    # The day's conversions per experiment, in the same transaction: new ones only.
    other = await new_experiment(store, "other")
    assert await store.insert_conversions(
        [conversion(other, "k1", assignment="b-1"), conversion(eid, "k3"), conversion(eid, "k3")]
    ) == [True, True, False]
    assert sum(t.conversions for t in await store.get_traffic(eid)) == 4
    assert sum(t.conversions for t in await store.get_traffic(other)) == 1


async def test_concurrent_retries_count_once(store: PostgresStore) -> None:
    eid = await new_experiment(store)
    # the same conversion sent by 10 tasks at once, each also carrying its own fresh one
    results = await asyncio.gather(
        *(
            store.insert_conversions([conversion(eid, "retry"), conversion(eid, f"own-{i}")])
            for i in range(10)
        )
    )
    assert sum(r[0] for r in results) == 1
    assert all(r[1] for r in results)
    counts = await store.load_counts(eid)
    assert {(h, c, s) for _, h, _, _, c, s in counts} == {(h, 11, 11 * 2.5) for h in PATH}
    assert sum(t.conversions for t in await store.get_traffic(eid)) == 11


async def test_conversion_batch_is_atomic(store: PostgresStore) -> None:
    eid = await new_experiment(store)
    bad = ConversionRow("a-9", eid + 1000, 0, [1])  # unknown experiment: FK violation
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await store.insert_conversions([conversion(eid, "k1"), bad])
    assert await store.load_counts(eid) == []
    assert await store.get_traffic(eid) == []
    # nothing was recorded, so the retry counts
    assert await store.insert_conversions([conversion(eid, "k1")]) == [True]


async def test_segments_round_trip(store: PostgresStore) -> None:
    eid = await new_experiment(store)
    rows = [
        SegmentRow(eid, PATH[0], "", 0, None),
        SegmentRow(eid, PATH[1], "country:us", 1, PATH[0], {"country": "us"}),
        SegmentRow(eid, PATH[2], "country:us|device:mobile", 2, PATH[1], {"device": "mobile"}),
    ]
    assert await store.upsert_segments([]) == 0
    assert await store.upsert_segments(rows) == 3
    assert await store.upsert_segments(rows[1:]) == 0
    assert await store.list_segments(eid) == rows
    async with store.pool.acquire() as conn:
        ancestors = await conn.fetch(
            "SELECT segment_key FROM get_segment_ancestors($1, $2)", eid, to_signed64(PATH[2])
        )
    assert [r["segment_key"] for r in ancestors] == ["country:us", ""]


async def test_traffic_audit_and_analytics(store: PostgresStore) -> None:
    eid = await new_experiment(store)
    day = date(2025, 3, 1)
    await store.add_traffic(eid, day, visitors=10, allocations=12)
    await store.add_traffic(eid, day, visitors=5, conversions=2)
    await store.add_traffic(eid, date(2025, 3, 2), visitors=1)
    traffic = await store.get_traffic(eid)
    assert [(t.day, t.visitors, t.allocations, t.conversions) for t in traffic] == [
        (day, 15, 12, 2),
        (date(2025, 3, 2), 1, 0, 0),
    ]
    assert len(await store.get_traffic(eid, since=date(2025, 3, 2))) == 1

    first = await store.write_audit("admin@example.com", "delete_user_data", "user-1", {"n": 3})
    second = await store.write_audit("system", "auto_activation", "checkout-button")
    assert second > first

    await store.apply_count_deltas([(eid, PATH[0], 0, 10, 1, 0.0), (eid, PATH[1], 0, 4, 1, 0.0)])
    assert await store.refresh_analytics()
    assert await store.refresh_analytics()
    async with store.pool.acquire() as conn:
        audit = await conn.fetchrow("SELECT * FROM audit_log WHERE id = $1", first)
        lift = await conn.fetchval(
            "SELECT lift_ratio FROM mv_segment_analytics WHERE segment_hash = $1",
            to_signed64(PATH[1]),
        )
    assert audit is not None
    assert (audit["actor"], audit["target"], audit["details"]) == (
        "admin@example.com",
        "user-1",
        {"n": 3},
    )
    assert lift == pytest.approx(0.25 / 0.1)


async def test_embedded_postgres_keeps_data_across_restarts(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg" / "data")
    dsn = await asyncio.to_thread(server.start)
    try:
        assert server.start() == dsn  # idempotent
        assert await migrate(dsn) != []
        async with await PostgresStore.connect(dsn, 1, 1) as store:
            await new_experiment(store, "kept")
    finally:
        await asyncio.to_thread(server.stop)
    server.stop()  # idempotent
    assert server.dsn is None

    restarted = EmbeddedPostgres(tmp_path / "pg" / "data")
    dsn = await asyncio.to_thread(restarted.start)
    try:
        assert await migrate(dsn) == []
        async with await PostgresStore.connect(dsn, 1, 1) as store:
            kept = await store.get_experiment("kept")
        assert kept is not None
        assert [v.key for v in kept.variants] == ["blue", "green", "red"]
    finally:
        await asyncio.to_thread(restarted.stop)


async def _shown(dsn: str, name: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval(f"SHOW {name}"))
    finally:
        await conn.close()


async def _until_shown(dsn: str, name: str, value: str, seconds: float = 10.0) -> None:
    # A configuration reload reaches new connections once the postmaster has read it.
    deadline = asyncio.get_running_loop().time() + seconds
    while (shown := await _shown(dsn, name)) != value:
        assert asyncio.get_running_loop().time() < deadline, f"{name} is {shown}, not {value}"
        await asyncio.sleep(0.05)


async def test_embedded_postgres_spaces_checkpoints_unless_an_operator_set_them(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "pg"
    server = EmbeddedPostgres(data_dir)
    dsn = await asyncio.to_thread(server.start)
    try:
        await _until_shown(dsn, "max_wal_size", "4GB")
        assert await _shown(dsn, "checkpoint_timeout") == "15min"
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("ALTER SYSTEM SET max_wal_size = '2GB'")
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(server.stop)
    configured = (data_dir / "postgresql.conf").read_text()

    restarted = EmbeddedPostgres(data_dir)
    dsn = await asyncio.to_thread(restarted.start)
    try:
        # The operator's setting wins; the file is not appended to again.
        assert await _shown(dsn, "max_wal_size") == "2GB"
        assert await _shown(dsn, "checkpoint_timeout") == "15min"
        assert (data_dir / "postgresql.conf").read_text() == configured
    finally:
        await asyncio.to_thread(restarted.stop)


async def test_close_ends_while_a_connection_is_still_held(migrated_db: str) -> None:
    # asyncpg's Pool.close alone waits for the held connection for as long as it is held.
    store = await PostgresStore.connect(migrated_db, min_size=1, max_size=2)
    held = await store.pool.acquire()
    backend = held.get_server_pid()
    await asyncio.wait_for(store.close(timeout=0.5), 10)
    assert store.pool.is_closing()
    # The held connection was terminated: its backend goes away.
    conn = await asyncpg.connect(migrated_db)
    try:
        for _ in range(100):
            if not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", backend
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"backend {backend} still there")
    finally:
        await conn.close()


async def test_analytics_are_refreshed_by_one_process_at_a_time_and_not_again_while_fresh(
    store: PostgresStore, migrated_db: str
) -> None:
    # Every process's write-behind refreshes the view; a refresh of millions of counters takes
    # minutes, so a second one at once, or one right after another's, is skipped.
    eid = (await store.insert_experiment(ExperimentRow(key="fresh-view", status="running"))).id
    await store.apply_count_deltas([(eid, PATH[0], 0, 10, 1, 0.0)])

    async def refreshed_at() -> Any:
        async with store.pool.acquire() as conn:
            return await conn.fetchval("SELECT max(refreshed_at) FROM mv_segment_analytics")

    assert await store.refresh_analytics(older_than_s=60)  # empty: never refreshed with rows
    first = await refreshed_at()
    assert first is not None
    assert not await store.refresh_analytics(older_than_s=60)
    assert await refreshed_at() == first
    # Another connection refreshing (holding the lock in its transaction): skipped, whatever
    # the age.
    other = await asyncpg.connect(migrated_db)
    try:
        async with other.transaction():
            assert await other.fetchval(
                "SELECT pg_try_advisory_xact_lock($1)", postgres_module._ANALYTICS_LOCK
            )
            assert not await store.refresh_analytics()
    finally:
        await other.close()
    assert await refreshed_at() == first
    assert await store.refresh_analytics()
    assert await refreshed_at() > first


async def test_the_experiment_poll_reads_experiments_only_when_one_changed(
    store: PostgresStore,
) -> None:
    # Each process polled every experiment every second (46 ms of its event loop at 1,000 of
    # them, bench/RESULTS.md item 70); now a one-row fingerprint says whether to.
    await new_experiment(store, "poll-a")
    before = await store.experiments_fingerprint()
    assert await store.experiments_fingerprint() == before
    seen: list[list[str]] = []
    journal = PostgresJournal(store, experiment_interval=0.02)
    journal.start(lambda experiments: seen.append(sorted(e.key for e in experiments)))
    try:
        await _until(lambda: len(seen) == 1)
        await asyncio.sleep(0.2)  # about ten polls, nothing changed
        assert seen == [["poll-a"]]
        await new_experiment(store, "poll-b")
        await _until(lambda: len(seen) == 2)
        assert seen[1] == ["poll-a", "poll-b"]
        await store.update_experiment(
            ExperimentRow(key="poll-a", name="renamed", status="paused", variants=VARIANTS)
        )
        await _until(lambda: len(seen) == 3)
        await asyncio.sleep(0.2)
        assert len(seen) == 3
    finally:
        await journal.close()
    assert await store.experiments_fingerprint() != before


async def _until(done: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)
