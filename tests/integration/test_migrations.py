"""Migrations: applied once, in order, safely from several replicas; schema objects compute the
right numbers on a hand-made dataset."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from allocsvc.store import (
    ExperimentRow,
    MigrationChecksumError,
    MigrationError,
    PostgresStore,
    VariantRow,
    load_migrations,
    migrate,
    to_signed64,
)
from allocsvc.store import migrations as migrations_module

pytestmark = pytest.mark.integration

REPO_SQL = Path(__file__).resolve().parents[2] / "sql"

TABLES = {
    "experiments",
    "variants",
    "segmentation_config",
    "segment_variant_state",
    "context_segments",
    "segment_hierarchy",
    "assignments",
    "conversions",
    "traffic_stats",
    "clustering_models",
    "recommendations",
    "regions",
    "audit_log",
    "schema_migrations",
}
VIEWS = {"v_segment_performance", "v_segment_lift"}
FUNCTIONS = {
    "global_segment_hash",
    "get_or_create_segment",
    "update_segment_stats",
    "get_segment_children",
    "get_segment_ancestors",
    "record_conversions",
    "add_traffic",
    "add_counts",
}
GLOBAL = 3244421341483603138  # xxh3-64 of b"", also < 2**63 so signed == unsigned


async def test_migrate_applies_everything_once(fresh_db: str) -> None:
    expected = [m.name for m in load_migrations()]
    assert expected[:2] == ["001_core", "002_segment_analytics"]

    assert await migrate(fresh_db) == expected
    assert await migrate(fresh_db) == []

    conn = await asyncpg.connect(fresh_db)
    try:
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY 1")
    finally:
        await conn.close()
    assert [(r["version"], r["name"], r["checksum"]) for r in rows] == [
        (m.version, m.name, m.checksum) for m in load_migrations()
    ]


async def test_replicas_migrating_together_apply_once(fresh_db: str) -> None:
    results = await asyncio.gather(*(migrate(fresh_db) for _ in range(4)))
    expected = [m.name for m in load_migrations()]
    assert sorted(results, key=len) == [[], [], [], expected]


async def test_migrate_accepts_connection_and_pool(fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await migrate(conn) != []
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(fresh_db, min_size=1, max_size=2)
    try:
        assert await migrate(pool) == []
    finally:
        await pool.close()


async def test_changed_migration_is_refused_and_new_one_applied(
    fresh_db: str, tmp_path: Path
) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(REPO_SQL, sql_dir)
    await migrate(fresh_db, directory=sql_dir)

    (sql_dir / "900_extra.sql").write_text("CREATE TABLE extra (id int);\n")
    assert await migrate(fresh_db, directory=sql_dir) == ["900_extra"]

    # CRLF line endings are not an edit
    first = sql_dir / "001_core.sql"
    first.write_bytes(first.read_bytes().replace(b"\n", b"\r\n"))
    assert await migrate(fresh_db, directory=sql_dir) == []

    with first.open("a") as f:
        f.write("-- edited\n")
    with pytest.raises(MigrationChecksumError, match="001_core"):
        await migrate(fresh_db, directory=sql_dir)


async def test_failed_migration_is_rolled_back(fresh_db: str, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    sql_dir.mkdir()
    (sql_dir / "001_ok.sql").write_text("CREATE TABLE ok (id int);")
    (sql_dir / "002_bad.sql").write_text("CREATE TABLE half (id int); SELECT no_such_function();")
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrate(fresh_db, directory=sql_dir)

    conn = await asyncpg.connect(fresh_db)
    try:
        assert await conn.fetchval("SELECT to_regclass('ok') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('half') IS NULL")
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 1
        # the advisory lock was released with the failure
        assert await conn.fetchval(
            "SELECT pg_try_advisory_lock($1)", migrations_module.MIGRATION_LOCK_KEY
        )
    finally:
        await conn.close()


async def test_a_store_pool_keeps_no_migration_lock(fresh_db: str, tmp_path: Path) -> None:
    """The store's pool does not reset a session when it takes a connection back (a round trip
    per release, for state the store never leaves): the migration runner's session lock is
    gone all the same, after a failed migration too, and the next migration takes it."""
    sql_dir = tmp_path / "sql"
    sql_dir.mkdir()
    (sql_dir / "001_ok.sql").write_text("CREATE TABLE ok (id int);")
    (sql_dir / "002_bad.sql").write_text("SELECT no_such_function();")
    store = await PostgresStore.connect(fresh_db, min_size=1, max_size=1)
    other = await asyncpg.connect(fresh_db)
    try:
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await migrate(store.pool, directory=sql_dir)
        key = migrations_module.MIGRATION_LOCK_KEY
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", key)
        assert await other.fetchval("SELECT pg_advisory_unlock($1)", key)
        (sql_dir / "002_bad.sql").write_text("CREATE TABLE fixed (id int);")
        assert await migrate(store.pool, directory=sql_dir) == ["002_bad"]
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", key)
    finally:
        await other.close()
        await store.close()


def test_malformed_migration_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="no migration files"):
        load_migrations(tmp_path)
    (tmp_path / "core.sql").write_text("")
    with pytest.raises(MigrationError, match=r"001_name\.sql"):
        load_migrations(tmp_path)
    (tmp_path / "core.sql").unlink()
    (tmp_path / "001_a.sql").write_text("")
    (tmp_path / "1_b.sql").write_text("")
    with pytest.raises(MigrationError, match="two migrations with version 1"):
        load_migrations(tmp_path)


def test_migrations_are_found_inside_the_package() -> None:
    packaged = migrations_module.default_sql_dir()
    assert packaged == Path(migrations_module.__file__).parent / "sql"
    assert sorted(p.name for p in packaged.glob("*.sql")) == sorted(
        p.name for p in REPO_SQL.glob("*.sql")
    )


def test_global_segment_hash_is_xxh3_of_the_empty_key() -> None:
    xxhash = pytest.importorskip("xxhash")
    assert xxhash.xxh3_64_intdigest(b"") == GLOBAL


async def test_every_schema_object_exists(migrated_db: str) -> None:
    conn = await asyncpg.connect(migrated_db)
    try:
        tables = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            )
        }
        views = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.views WHERE table_schema = 'public'"
            )
        }
        matviews = {
            r["matviewname"] for r in await conn.fetch("SELECT matviewname FROM pg_matviews")
        }
        functions = {
            r["proname"]
            for r in await conn.fetch(
                "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
            )
        }
        unique_mv_index = await conn.fetchval(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
            " WHERE c.relname = 'mv_segment_analytics' AND i.indisunique"
        )
        assert await conn.fetchval("SELECT global_segment_hash()") == GLOBAL
    finally:
        await conn.close()
    assert tables >= TABLES
    assert views >= VIEWS
    assert matviews == {"mv_segment_analytics"}
    assert functions >= FUNCTIONS
    assert unique_mv_index == 1


# A hand-made dataset: global, country:us, country:us|device:mobile, country:de; variants 0 and 1.
US = to_signed64(2**64 - 5)  # negative when stored
US_MOBILE = to_signed64(2**63)  # the smallest BIGINT
DE = 42
COUNTS = {
    # segment: {variant: (allocations, conversions)}
    GLOBAL: {0: (1000, 100), 1: (1000, 150)},
    US: {0: (400, 60), 1: (500, 50)},
    US_MOBILE: {0: (100, 5), 1: (200, 40)},
    DE: {0: (50, 0)},
}


@pytest.fixture
async def dataset(migrated_db: str) -> AsyncIterator[tuple[asyncpg.Connection, int]]:
    store = await PostgresStore.connect(migrated_db, 1, 2)
    try:
        experiment = await store.insert_experiment(
            ExperimentRow(
                key="checkout-button",
                name="Checkout button",
                status="running",
                variants=[VariantRow(0, "blue"), VariantRow(1, "green")],
            )
        )
    finally:
        await store.close()
    assert experiment.id is not None
    eid = experiment.id
    conn = await asyncpg.connect(migrated_db)
    segments = [
        (GLOBAL, "", 0, None),
        (US, "country:us", 1, GLOBAL),
        (US_MOBILE, "country:us|device:mobile", 2, US),
        (DE, "country:de", 1, GLOBAL),
    ]
    for seg_hash, key, level, parent in segments:
        created = await conn.fetchval(
            "SELECT get_or_create_segment($1, $2, $3, $4, $5)", eid, seg_hash, key, level, parent
        )
        assert created == seg_hash
    for seg_hash, by_variant in COUNTS.items():
        for variant, (allocations, conversions) in by_variant.items():
            # two increments per row: the function must add, not overwrite
            half = allocations // 2
            await conn.execute(
                "SELECT update_segment_stats($1, $2, $3, $4, $5, $6)",
                eid, seg_hash, variant, half, 0, 0.0,
            )  # fmt: skip
            await conn.execute(
                "SELECT update_segment_stats($1, $2, $3, $4, $5, $6)",
                eid, seg_hash, variant, allocations - half, conversions, conversions * 2.5,
            )  # fmt: skip
    try:
        yield conn, eid
    finally:
        await conn.close()


async def test_update_segment_stats_increments(dataset: tuple[asyncpg.Connection, int]) -> None:
    conn, eid = dataset
    rows = await conn.fetch(
        "SELECT segment_hash, variant, allocations, conversions, value_sum"
        " FROM segment_variant_state WHERE experiment_id = $1",
        eid,
    )
    got = {(r["segment_hash"], r["variant"]): tuple(r)[2:] for r in rows}
    assert got == {
        (h, v): (a, c, c * 2.5) for h, by_v in COUNTS.items() for v, (a, c) in by_v.items()
    }


async def test_segment_performance_view(dataset: tuple[asyncpg.Connection, int]) -> None:
    conn, eid = dataset
    rows = await conn.fetch(
        "SELECT segment_key, level, variant, variant_key, allocations, conversions,"
        " conversion_rate, experiment_key FROM v_segment_performance WHERE experiment_id = $1",
        eid,
    )
    got = {(r["segment_key"], r["variant"]): r for r in rows}
    assert len(got) == 7
    assert got[("", 0)]["conversion_rate"] == pytest.approx(0.10)
    assert got[("", 1)]["conversion_rate"] == pytest.approx(0.15)
    assert got[("", 1)]["level"] == 0
    assert got[("country:us", 0)]["conversion_rate"] == pytest.approx(0.15)
    assert got[("country:us|device:mobile", 1)]["conversion_rate"] == pytest.approx(0.20)
    assert got[("country:us|device:mobile", 1)]["level"] == 2
    assert got[("country:de", 0)]["conversion_rate"] == 0.0
    assert got[("country:us", 1)]["variant_key"] == "green"
    assert {r["experiment_key"] for r in rows} == {"checkout-button"}


async def test_segment_lift_view(dataset: tuple[asyncpg.Connection, int]) -> None:
    conn, eid = dataset
    rows = await conn.fetch(
        "SELECT segment_key, variant, lift_ratio, global_conversion_rate"
        " FROM v_segment_lift WHERE experiment_id = $1",
        eid,
    )
    lift = {(r["segment_key"], r["variant"]): r["lift_ratio"] for r in rows}
    assert lift == {
        ("country:us", 0): pytest.approx(1.5),
        ("country:us", 1): pytest.approx(0.1 / 0.15),
        ("country:us|device:mobile", 0): pytest.approx(0.5),
        ("country:us|device:mobile", 1): pytest.approx(0.2 / 0.15),
        ("country:de", 0): 0.0,
    }
    assert {r["variant"]: r["global_conversion_rate"] for r in rows} == {
        0: pytest.approx(0.10),
        1: pytest.approx(0.15),
    }


async def test_segment_analytics_refresh(dataset: tuple[asyncpg.Connection, int]) -> None:
    conn, eid = dataset
    # created empty by the migration; filled by a refresh (concurrent, so it needs the index)
    assert await conn.fetchval("SELECT count(*) FROM mv_segment_analytics") == 0
    await conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY mv_segment_analytics")
    rows = await conn.fetch(
        "SELECT segment_key, variant, allocation_share, lift_ratio, segment_allocations"
        " FROM mv_segment_analytics WHERE experiment_id = $1",
        eid,
    )
    got = {(r["segment_key"], r["variant"]): r for r in rows}
    assert len(got) == 7
    assert got[("country:us", 0)]["allocation_share"] == pytest.approx(400 / 900)
    assert got[("country:us", 0)]["segment_allocations"] == 900
    assert got[("", 1)]["lift_ratio"] == pytest.approx(1.0)
    assert got[("country:us", 0)]["lift_ratio"] == pytest.approx(1.5)

    await conn.execute(
        "SELECT update_segment_stats($1, $2, 0, 100, 0, 0)", eid, GLOBAL
    )  # rate of global variant 0: 100/1100
    await conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY mv_segment_analytics")
    lift = await conn.fetchval(
        "SELECT lift_ratio FROM mv_segment_analytics"
        " WHERE experiment_id = $1 AND segment_hash = $2 AND variant = 0",
        eid,
        US,
    )
    assert lift == pytest.approx(0.15 / (100 / 1100))


async def test_segment_children_and_ancestors(dataset: tuple[asyncpg.Connection, int]) -> None:
    conn, eid = dataset

    async def children(seg_hash: int) -> list[tuple[int, str, int]]:
        rows = await conn.fetch("SELECT * FROM get_segment_children($1, $2)", eid, seg_hash)
        return [(r["segment_hash"], r["segment_key"], r["level"]) for r in rows]

    async def ancestors(seg_hash: int) -> list[tuple[int, int, str]]:
        rows = await conn.fetch("SELECT * FROM get_segment_ancestors($1, $2)", eid, seg_hash)
        return [(r["depth"], r["segment_hash"], r["segment_key"]) for r in rows]

    # from context_segments while no tree has been built
    assert await children(GLOBAL) == [(DE, "country:de", 1), (US, "country:us", 1)]
    assert await children(US) == [(US_MOBILE, "country:us|device:mobile", 2)]
    assert await children(US_MOBILE) == []
    assert await ancestors(US_MOBILE) == [(1, US, "country:us"), (2, GLOBAL, "")]
    assert await ancestors(GLOBAL) == []
    assert await ancestors(123456) == []

    # once built, the newest tree is the source; pruned nodes are no one's children
    tree = [
        (1, GLOBAL, None, 0, "", False),
        (1, US, GLOBAL, 1, "country:us", False),
        (1, DE, GLOBAL, 1, "country:de", False),
        (2, GLOBAL, None, 0, "", False),
        (2, US, GLOBAL, 1, "country:us", False),
        (2, US_MOBILE, US, 2, "country:us|device:mobile", True),
    ]
    await conn.executemany(
        "INSERT INTO segment_hierarchy (experiment_id, version, node_hash, parent_hash, level,"
        " segment_key, pruned) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [(eid, *node) for node in tree],
    )
    assert await children(GLOBAL) == [(US, "country:us", 1)]
    assert await children(US) == []
    assert await ancestors(US_MOBILE) == [(1, US, "country:us"), (2, GLOBAL, "")]


async def test_get_or_create_segment_detects_a_hash_taken_by_another_key(
    dataset: tuple[asyncpg.Connection, int],
) -> None:
    conn, eid = dataset
    again = await conn.fetchval(
        "SELECT get_or_create_segment($1, $2, 'country:us', 1, $3)", eid, US, GLOBAL
    )
    assert again == US
    with pytest.raises(asyncpg.UniqueViolationError, match="belongs to key"):
        await conn.fetchval(
            "SELECT get_or_create_segment($1, $2, 'country:fr', 1, $3)", eid, US, GLOBAL
        )
