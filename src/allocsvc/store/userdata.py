"""One user's personal data in a region's PostgreSQL and Redis: export and erasure.

The SQL lives in the database (`sql/004_regions_user_data.sql`, assignments found by experiment
since `sql/009_assignments_without_user_index.sql`; the blocks of
`sql/011_assignment_blocks.sql` whose filter may hold the user expanded first): every table
with a `user_id` column is personal data, so tables added later are covered without a change
here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from allocsvc.allocation.service import Assignment
from allocsvc.store.postgres import AssignmentRow, PostgresStore
from allocsvc.store.redis import RedisShared
from allocsvc.store.writebehind import PostgresJournal

Rows = dict[str, list[dict[str, Any]]]


class PostgresUserData:
    """Rows on a user in one PostgreSQL, and the user's assignments still in the write-behind
    buffer (dropped under the flush lock, so a flush cannot write them back)."""

    name = "postgres"

    def __init__(self, store: PostgresStore, journal: PostgresJournal) -> None:
        self._store = store
        self._journal = journal

    async def export(self, user_id: str) -> Rows:
        out: Rows = {}
        await self._store.expand_blocks_of_user(user_id)  # its assignments may be in blocks
        for record in await self._store.pool.fetch(
            "SELECT table_name, row_data FROM export_user_rows($1)", user_id
        ):
            out.setdefault(str(record["table_name"]), []).append(dict(record["row_data"]))
        pending = self._journal.pending_assignments_of(user_id)
        if pending:
            out["pending_assignments"] = [_assignment_row(r) for r in pending]
        return out

    async def erase(self, user_id: str, audit_target: str) -> dict[str, int]:
        async def run() -> dict[str, int]:
            # Under the flush lock: no block of this process's is written meanwhile.
            await self._store.expand_blocks_of_user(user_id)
            records = await self._store.pool.fetch(
                "SELECT table_name, removed FROM erase_user_rows($1, $2)", user_id, audit_target
            )
            return {str(r["table_name"]): int(r["removed"]) for r in records}

        dropped, removed = await self._journal.without_user(user_id, run)
        removed["pending_assignments"] = len(dropped)
        return removed


class RedisUserData:
    """Sticky entries and assignment records of a user in one Redis namespace."""

    name = "redis"

    def __init__(self, shared: RedisShared, handles: Callable[[], Iterable[int]]) -> None:
        self._shared = shared
        self._handles = handles

    async def export(self, user_id: str) -> Rows:
        found = await self._shared.user_keys(user_id, self._handles())
        if not found:
            return {}
        return {
            "keys": [
                {"key": key, "assignment": _assignment_fields(a)}
                for key, a in sorted(found.items())
            ]
        }

    async def erase(self, user_id: str, audit_target: str) -> dict[str, int]:
        return {"keys": await self._shared.erase_user(user_id, self._handles())}


def _assignment_row(row: AssignmentRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "experiment_id": row.experiment_id,
        "user_id": row.user_id,
        "variant": row.variant,
        "segment_key": row.segment_key,
        "cascade_level": row.cascade_level,
        "propensity": row.propensity,
        "created_at": None if row.created_at is None else row.created_at.isoformat(),
    }


def _assignment_fields(a: Assignment) -> dict[str, Any]:
    return {
        "id": a.id,
        "experiment_id": a.experiment_key,
        "user_id": a.user_id,
        "variant": a.variant,
        "segment_key": a.segment_key,
        "cascade_level": a.cascade_level,
        "propensity": a.propensity,
        "created_ms": a.created_ms,
    }
