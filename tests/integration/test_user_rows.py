"""One user's rows in PostgreSQL (export_user_rows / erase_user_rows) after migration 009: the
user's assignments are found through (experiment_id, user_id) in every experiment that has any,
one whose experiments row is gone included, and nobody else's."""

from __future__ import annotations

import json
from collections import Counter

import asyncpg
import pytest

from allocsvc.store import ExperimentRow, PostgresStore, VariantRow

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


async def test_a_users_assignments_are_found_by_index_without_a_user_id_index(
    migrated_db: str,
) -> None:
    ids = await _experiments(migrated_db, 2)
    conn = await asyncpg.connect(migrated_db)
    try:
        indexes = await conn.fetch(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'assignments'"
        )
        assert not [r for r in indexes if "(user_id)" in r["indexdef"]]

        await conn.execute(
            "INSERT INTO assignments (id, experiment_id, user_id, variant, segment_hash)"
            " SELECT 'a-' || k, ($1::bigint[])[1 + k % 2], 'user-' || k, 0, 7"
            " FROM generate_series(1, 5000) k",
            ids,
        )
        assert await conn.fetchval("SELECT assignment_experiment_ids()") == sorted(ids)
        await conn.execute("ANALYZE assignments")
        # With sequential scans priced out, a plan without a usable index still scans the table.
        await conn.execute("SET enable_seqscan = off")
        plan = await conn.fetch("EXPLAIN SELECT * FROM user_assignment_ids('user-42')")
        text = "\n".join(r[0] for r in plan)
        assert "assignments_experiment_user_idx" in text, text
        assert "Seq Scan" not in text, text
        # The leading column bound (not the whole index walked with user_id as a filter).
        conditions = [line for line in text.splitlines() if "Index Cond" in line]
        assert any("experiment_id = ANY" in line for line in conditions), text
        assert any("user_id = " in line for line in conditions), text
        found = await conn.fetch("SELECT * FROM user_assignment_ids('user-42')")
        assert Counter(r[0] for r in found) == Counter(["a-42"])
    finally:
        await conn.close()
