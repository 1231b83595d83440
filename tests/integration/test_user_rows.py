"""One user's rows in PostgreSQL (export_user_rows / erase_user_rows) after migrations 009 and
017: the user's assignments are found through the index on a hash of user_id, in every
experiment, one whose experiments row is gone included, and nobody else's."""

from __future__ import annotations

import json
from collections import Counter

import asyncpg
import pytest

from allocsvc.store import ExperimentRow, PostgresStore, VariantRow
from allocsvc.store.postgres import _LATEST_ASSIGNMENTS

pytestmark = pytest.mark.integration

ASSIGNMENT = (
    "INSERT INTO assignments (id, experiment_id, user_id, variant, segment_hash)"
    " VALUES ($1, $2, $3, 0, 7)"
)


async def _experiments(dsn: str, n: int) -> list[int]:
    store = await PostgresStore.connect(dsn, 1, 2)
    try:
        ids = []
        for k in range(n):
            row = await store.insert_experiment(
                ExperimentRow(
                    key=f"e{k}",
                    name=f"e{k}",
                    status="running",
                    variants=[VariantRow(0, "a"), VariantRow(1, "b")],
                )
            )
            assert row.id is not None
            ids.append(row.id)
        return ids
    finally:
        await store.close()


async def test_a_users_assignments_in_every_experiment_are_exported_and_erased(
    migrated_db: str,
) -> None:
    first, second, third = await _experiments(migrated_db, 3)
    gone = third + 1000  # an experiment deleted by hand: its assignments stay (migration 008)
    conn = await asyncpg.connect(migrated_db)
    try:
        for n, experiment in enumerate((first, second, second, gone)):
            await conn.execute(ASSIGNMENT, f"mine-{n}", experiment, "user-7")
        for n, experiment in enumerate((first, second, third, gone)):
            await conn.execute(ASSIGNMENT, f"other-{n}", experiment, "user-8")
        # Conversions naming no user are the user's through their assignment.
        await conn.execute(
            "INSERT INTO conversions (assignment_id, experiment_id, variant) VALUES"
            " ('mine-1', $1, 0), ('other-1', $1, 0)",
            second,
        )

        exported = [
            (r["table_name"], json.loads(r["row_data"]))
            for r in await conn.fetch("SELECT * FROM export_user_rows('user-7')")
        ]
        assignments = {row["id"] for table, row in exported if table == "assignments"}
        assert assignments == {"mine-0", "mine-1", "mine-2", "mine-3"}
        conversions = [row for table, row in exported if table == "conversions"]
        assert [c["assignment_id"] for c in conversions] == ["mine-1"]

        erased = await conn.fetch("SELECT * FROM erase_user_rows('user-7', 'erased:1')")
        removed = {r["table_name"]: r["removed"] for r in erased}
        assert removed["assignments"] == 4
        assert removed["conversions (by assignment)"] == 1

        left = await conn.fetch("SELECT id FROM assignments ORDER BY id")
        assert [r["id"] for r in left] == ["other-0", "other-1", "other-2", "other-3"]
        kept = await conn.fetch("SELECT assignment_id FROM conversions")
        assert [r["assignment_id"] for r in kept] == ["other-1"]
        assert await conn.fetch("SELECT * FROM export_user_rows('user-7')") == []
    finally:
        await conn.close()


async def test_a_users_assignments_are_found_by_the_user_hash_index(
    migrated_db: str,
) -> None:
    ids = await _experiments(migrated_db, 2)
    conn = await asyncpg.connect(migrated_db)
    try:
        indexes = [
            r["indexdef"]
            for r in await conn.fetch(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'assignments'"
            )
        ]
        # No index takes user ids themselves, only their hashes (migration 017).
        assert [d for d in indexes if "user_id" in d] == [
            "CREATE INDEX assignments_user_hash_idx ON public.assignments USING btree"
            " (hashtextextended(user_id, (0)::bigint))"
        ], indexes

        await conn.execute(
            "INSERT INTO assignments (id, experiment_id, user_id, variant, segment_hash)"
            " SELECT 'a-' || k, ($1::bigint[])[1 + k % 2], 'user-' || k, 0, 7"
            " FROM generate_series(1, 5000) k",
            ids,
        )
        await conn.execute("ANALYZE assignments")
        # With sequential scans priced out, a plan without a usable index still scans the table.
        await conn.execute("SET enable_seqscan = off")
        latest = _LATEST_ASSIGNMENTS
        for query, args in [
            ("SELECT * FROM user_assignment_ids('user-42')", ()),
            # What `PostgresStore.get_latest_assignments` asks.
            (latest, (ids[0], ["user-42", "user-43"])),
        ]:
            plan = await conn.fetch(f"EXPLAIN {query}", *args)
            text = "\n".join(r[0] for r in plan)
            assert "assignments_user_hash_idx" in text, text
            assert "Seq Scan" not in text, text
            conditions = [line for line in text.splitlines() if "Index Cond" in line]
            assert any("hashtextextended(user_id, " in line for line in conditions), text
        found = await conn.fetch("SELECT * FROM user_assignment_ids('user-42')")
        assert Counter(r[0] for r in found) == Counter(["a-42"])
        got = await conn.fetch(latest, ids[0], ["user-42", "user-43"])
        # user-42 is in the first experiment (k % 2 == 0), user-43 in the second.
        assert [r["id"] for r in got] == ["a-42"]
        # One user with many assignments (a btree keeps them apart by their place in the
        # table: no chain of pages to walk, as a hash index would have): every one found.
        await conn.execute(
            "INSERT INTO assignments (id, experiment_id, user_id, variant, segment_hash)"
            " SELECT 'hot-' || k, $1, 'user-hot', 0, 7 FROM generate_series(1, 3000) k",
            ids[1],
        )
        hot = await conn.fetch("SELECT * FROM user_assignment_ids('user-hot')")
        assert len(hot) == 3000
        assert [r["id"] for r in await conn.fetch(latest, ids[1], ["user-hot"])] == ["hot-3000"]
    finally:
        await conn.close()
