"""Reading back what the write-behind wrote."""

from __future__ import annotations

import asyncpg


async def assignment_rows(dsn: str, columns: str) -> dict[str, tuple[object, ...]]:
    """Every row of `assignments` by id: the id, then `columns` (a SELECT list) in order."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT id, {columns} FROM assignments")
    finally:
        await conn.close()
    return {r["id"]: tuple(r.values()) for r in rows}
