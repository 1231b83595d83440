"""Reading back what the write-behind wrote."""

from __future__ import annotations

import asyncpg

from allocsvc.allocation.service import Assignment
from allocsvc.core import key_hash
from allocsvc.store.postgres import to_signed64

# The columns an assignment is held with, after its id (`as_row`).
HELD_COLUMNS = (
    "experiment_id, user_id, variant, segment_key, segment_hash, cascade_level, propensity"
)


async def assignment_rows(dsn: str, columns: str) -> dict[str, tuple[object, ...]]:
    """Every row of `assignments` by id: the id, then `columns` (a SELECT list) in order."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT id, {columns} FROM assignments")
    finally:
        await conn.close()
    return {r["id"]: tuple(r.values()) for r in rows}


def as_row(a: Assignment) -> tuple[object, ...]:
    """The id and HELD_COLUMNS of `a` as PostgreSQL has them."""
    return (
        a.id,
        a.handle,
        a.user_id,
        a.variant,
        a.segment_key,
        to_signed64(key_hash(a.segment_key)),
        a.cascade_level,
        a.propensity,
    )
