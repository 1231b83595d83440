"""`write_behind_interval` is how often the server's journal writes what it answered: with a
minute (the most it takes), an allocation stays in memory until the stop writes it; with a
tenth of a second, a flush writes it while the journal runs."""

from __future__ import annotations

import asyncio
import time

import pytest
from store_support import assignment_rows, batch_service

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.api import convert
from allocsvc.config import Settings
from allocsvc.server import Stores, open_stores
from allocsvc.store.writebehind import PostgresJournal

pytestmark = pytest.mark.integration

# Ten flushes at the default interval.
WAIT_S = 1.0


async def _allocated(dsn: str, interval: float, user: str) -> Stores:
    """The server's stores for `dsn` at `interval`, their journal running, one user allocated."""
    settings = Settings(postgres_dsn=dsn, migrate=False, write_behind_interval=interval)
    stores = await open_stores(settings)
    assert isinstance(stores.journal, PostgresJournal)
    service = await batch_service(stores.journal)
    stores.journal.start()
    request = pb.AllocateRequest(experiment_id="one", user_id=user)
    await service.allocate(convert.allocate_request(request))
    return stores


async def _users(dsn: str) -> list[object]:
    return [row[1] for row in (await assignment_rows(dsn, "user_id")).values()]


async def test_a_minute_leaves_the_answer_to_the_stop(migrated_db: str) -> None:
    stores = await _allocated(migrated_db, 60, "early")
    try:
        await asyncio.sleep(WAIT_S)
        assert await _users(migrated_db) == []
    finally:
        await stores.close()
    assert await _users(migrated_db) == ["early"]


async def test_a_tenth_of_a_second_writes_it_while_running(migrated_db: str) -> None:
    stores = await _allocated(migrated_db, 0.1, "soon")
    try:
        deadline = time.monotonic() + 30  # a bound on a wait, not a measure of speed
        while not await _users(migrated_db):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await _users(migrated_db) == ["soon"]
    finally:
        await stores.close()
