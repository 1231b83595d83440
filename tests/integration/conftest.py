"""The store fixture most integration tests open on their migrated database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from allocsvc.store import PostgresStore


@pytest.fixture
async def store(migrated_db: str) -> AsyncIterator[PostgresStore]:
    async with await PostgresStore.connect(migrated_db, min_size=1, max_size=2) as s:
        yield s
