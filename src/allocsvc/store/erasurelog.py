"""The region's erasure log in PostgreSQL (`sql/005_erasure_log.sql`); see
allocsvc.regions.erasures for what reads it."""

from __future__ import annotations

import secrets

from allocsvc.regions.erasures import ErasureEntry
from allocsvc.store.postgres import PostgresStore

_CREATE_KEY = "INSERT INTO erasure_key (id, key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING"

_SINCE = """
SELECT id, user_hash, receipt FROM erasure_log WHERE id > $1 ORDER BY id LIMIT $2
"""


class PostgresErasureLog:
    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def key(self) -> bytes:
        pool = self._store.pool
        await pool.execute(_CREATE_KEY, secrets.token_bytes(32))
        return bytes(await pool.fetchval("SELECT key FROM erasure_key WHERE id = 1"))

    async def append(self, user_hash: bytes, receipt: str) -> int:
        # Appends one at a time, so ids become visible in order: a reader that saw id n never
        # sees a smaller id committed later (a sequence alone does not promise that).
        async with self._store.pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE erasure_log IN EXCLUSIVE MODE")
            entry_id = await conn.fetchval(
                "INSERT INTO erasure_log (user_hash, receipt) VALUES ($1, $2) RETURNING id",
                user_hash,
                receipt,
            )
        return int(entry_id)

    async def latest_id(self) -> int:
        return int(await self._store.pool.fetchval("SELECT coalesce(max(id), 0) FROM erasure_log"))

    async def since(self, after_id: int, limit: int) -> list[ErasureEntry]:
        rows = await self._store.pool.fetch(_SINCE, after_id, limit)
        return [ErasureEntry(int(r["id"]), bytes(r["user_hash"]), str(r["receipt"])) for r in rows]
