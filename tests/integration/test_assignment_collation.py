"""Migration 010: assignment ids and user ids compare byte by byte ("C"), and the lookups the
server makes still bind both columns in their indexes (a parameter's default collation
combines with the column's; since migration 017 user ids through their hashes)."""

from __future__ import annotations

import asyncpg
import pytest

from allocsvc.store.postgres import _LATEST_ASSIGNMENTS

pytestmark = pytest.mark.integration


def _index_conditions(plan: list[asyncpg.Record]) -> str:
    return "\n".join(r[0] for r in plan if "Index Cond" in r[0])


async def test_assignment_keys_compare_bytewise_and_stay_indexed(migrated_db: str) -> None:
    conn = await asyncpg.connect(migrated_db)
    try:
        collations = dict(
            await conn.fetch(
                "SELECT a.attname, c.collname FROM pg_attribute a"
                " JOIN pg_collation c ON c.oid = a.attcollation"
                " WHERE a.attrelid = 'assignments'::regclass AND a.attname IN ('id', 'user_id')"
            )
        )
        assert collations == {"id": "C", "user_id": "C"}

        await conn.execute(
            "INSERT INTO assignments (id, experiment_id, user_id, variant, segment_hash)"
            " SELECT 'a-' || k, 1 + k % 3, 'user-' || k, 0, 7 FROM generate_series(1, 3000) k"
        )
        await conn.execute("ANALYZE assignments")
        await conn.execute("SET enable_seqscan = off")
        # The store's queries (PostgresStore.get_latest_assignments, get_assignment_by_id),
        # with text parameters as asyncpg sends them; user-41 is in experiment 1 + 41 % 3 = 3.
        # A user's rows are found by the hash of the column's bytes (migration 017) that the
        # parameter's hash, in its default collation, equals.
        by_user = await conn.fetch(f"EXPLAIN {_LATEST_ASSIGNMENTS}", 3, ["user-41"])
        assert "hashtextextended(user_id, " in _index_conditions(by_user), by_user
        by_id = await conn.fetch("EXPLAIN SELECT * FROM assignments WHERE id = $1", "a-41")
        assert "(id = 'a-41'::text)" in _index_conditions(by_id), by_id
        rows = await conn.fetch(_LATEST_ASSIGNMENTS, 3, ["user-41", "user-42"])
        assert [r["id"] for r in rows] == ["a-41"]
    finally:
        await conn.close()
