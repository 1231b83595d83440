"""Assignments evicted from memory (max_held_assignments) are read back from PostgreSQL: a
returning sticky user gets the same assignment (unary, the Rust unary path, a batch), and a
conversion finds its assignment by id or by experiment and user. Memory stays bounded."""

from __future__ import annotations

import asyncio

import pytest

from allocsvc import server
from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import (
    AllocationRequest,
    AllocationService,
    Assignment,
    ConversionRequest,
    Limits,
)
from allocsvc.api import convert
from allocsvc.api.allocator import AllocatorServicer
from allocsvc.context import Extractor
from allocsvc.core import Engine
from allocsvc.store import PostgresStore
from allocsvc.store.writebehind import PostgresJournal

pytestmark = pytest.mark.integration

HELD = 40


def _same(a: Assignment, b: Assignment) -> bool:
    """Equal but for the time (PostgreSQL keeps the write-behind's, up to a flush later)."""
    return a._replace(created_ms=0) == b._replace(created_ms=0)


async def _service(journal: PostgresJournal | MemoryJournal) -> AllocationService:
    service = AllocationService(Engine(), journal, Extractor(), Limits(max_held_assignments=HELD))
    for key, sticky in (("sticky", True), ("plain", False)):
        experiment = pb.Experiment(
            id=key,
            status=pb.EXPERIMENT_STATUS_RUNNING,
            sticky=sticky,
            variants=[pb.Variant(id=v) for v in "ABCDE"],
        )
        await service.create_experiment(convert.experiment_from_pb(experiment))
    return service


async def _first_users(
    service: AllocationService, journal: PostgresJournal, n: int
) -> list[Assignment]:
    made = []
    for i in range(n):
        allocation = await service.allocate(AllocationRequest("sticky", f"user-{i}"))
        made.append(allocation.assignment)
        if i % 10 == 9:
            await journal.flush()
    return made


async def test_evicted_sticky_assignments_come_back_from_postgres(store: PostgresStore) -> None:
    journal = PostgresJournal(store, max_pending_assignments=HELD // 2)
    journal.start()  # the group commit answers conversions
    service = await _service(journal)
    first = await _first_users(service, journal, 3 * HELD)
    assert not service.holds(experiment_key="sticky", user_id="user-0")
    assert len(service.user_assignments("user-0")) == 0
    # Unary: the same assignment again, sticky.
    again = await service.allocate(AllocationRequest("sticky", "user-0"))
    assert again.sticky and _same(again.assignment, first[0])
    # The Rust unary path hands an evicted user to the caller, which finds it.
    wire = pb.AllocateRequest(experiment_id="sticky", user_id="user-1").SerializeToString()
    assert service.allocate_wire(wire, "local") is None
    again = await service.allocate(AllocationRequest("sticky", "user-1"))
    assert again.sticky and _same(again.assignment, first[1])
    # A batch: every evicted user answered with the assignment made first.
    servicer = AllocatorServicer(service, "local")
    batch = pb.AllocateBatchRequest(
        requests=[
            pb.AllocateRequest(experiment_id="sticky", user_id=f"user-{i}") for i in range(2, 8)
        ]
    )
    reply = pb.AllocateBatchResponse.FromString(
        await servicer.AllocateBatchBytes(batch.SerializeToString(), None)  # type: ignore[arg-type]
    )
    got = [(r.allocation.assignment_id, r.allocation.sticky) for r in reply.results]
    assert got == [(first[i].id, True) for i in range(2, 8)]
    # Conversions by id and by experiment and user, of evicted assignments.
    by_id, by_user = await service.record_conversions(
        [
            ConversionRequest(assignment_id=first[10].id),
            ConversionRequest(experiment_key="sticky", user_id="user-11"),
        ]
    )
    assert not isinstance(by_id, Exception) and _same(by_id.assignment, first[10])
    assert by_id.counted
    assert not isinstance(by_user, Exception) and _same(by_user.assignment, first[11])
    # A user never seen is still new (a miss in PostgreSQL too).
    new = await service.allocate(AllocationRequest("sticky", "someone-else"))
    assert not new.sticky
    assert service._held.evictions >= 2 * HELD
    assert len(service._held) <= HELD
    await journal.close()


async def test_without_a_durable_store_an_evicted_user_is_new() -> None:
    service = await _service(MemoryJournal())
    for i in range(2 * HELD):
        await service.allocate(AllocationRequest("sticky", f"user-{i}"))
    assert len(service._held) == HELD
    assert not (await service.allocate(AllocationRequest("sticky", "user-0"))).sticky


async def test_a_restart_holds_the_newest_and_finds_the_rest_in_postgres(
    store: PostgresStore,
) -> None:
    journal = PostgresJournal(store, max_pending_assignments=HELD // 2)
    service = await _service(journal)
    first = []
    for i in range(3 * HELD):
        first.append((await service.allocate(AllocationRequest("sticky", f"user-{i}"))).assignment)
        await asyncio.sleep(0.002)  # each its own millisecond: "newest" is then this order
        if i % 10 == 9:
            await journal.flush()
    await journal.close()
    # The next process, memory for HELD assignments: it reads only the newest HELD + 1 (the
    # table could hold far more than fits), so holding them evicts one, which tells it that
    # PostgreSQL has users it does not hold.
    journal = PostgresJournal(store, max_pending_assignments=HELD // 2)
    journal.start()
    restarted = AllocationService(Engine(), journal, Extractor(), Limits(max_held_assignments=HELD))
    loaded = await server.restore(journal, restarted)
    assert (loaded["experiments"], loaded["assignments"]) == (2, HELD + 1)
    assert len(restarted._held) == HELD
    held = [restarted.holds(experiment_key="sticky", user_id=f"user-{i}") for i in range(3 * HELD)]
    assert held == [False] * (2 * HELD) + [True] * HELD
    # Held as they were made (read back through a binary COPY stream), but for the time.
    for a in first[-HELD:]:
        again = restarted._latest_of((a.handle, a.user_id))
        assert again is not None and _same(again, a), (again, a)
    # Users only PostgreSQL holds keep their assignments: unary, and a conversion by id.
    again = await restarted.allocate(AllocationRequest("sticky", "user-0"))
    assert again.sticky and _same(again.assignment, first[0])
    (converted,) = await restarted.record_conversions(
        [ConversionRequest(assignment_id=first[HELD].id)]
    )
    assert not isinstance(converted, Exception) and _same(converted.assignment, first[HELD])
    await journal.close()
    # With no bound, a restart reads them all.
    journal = PostgresJournal(store)
    unbounded = AllocationService(Engine(), journal, Extractor())
    assert (await server.restore(journal, unbounded))["assignments"] == 3 * HELD
    assert all(unbounded.holds(assignment_id=a.id) for a in first)
