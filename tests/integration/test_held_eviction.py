"""Assignments evicted from memory (max_held_assignments) are read back from PostgreSQL: a
returning sticky user gets the same assignment (unary, the Rust unary path, a batch), and a
conversion finds its assignment by id or by experiment and user. Memory stays bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from allocsvc import server
from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.experiments import Experiment
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
from allocsvc.errors import Unavailable
from allocsvc.store import PostgresStore
from allocsvc.store.writebehind import PostgresJournal

pytestmark = pytest.mark.integration

HELD = 40


def _same(a: Assignment, b: Assignment) -> bool:
    """Equal but for the time (PostgreSQL keeps the write-behind's, up to a flush later)."""
    return a._replace(created_ms=0) == b._replace(created_ms=0)


async def _service(
    journal: PostgresJournal | MemoryJournal, limits: Limits | None = None
) -> AllocationService:
    limits = limits or Limits(max_held_assignments=HELD)
    service = AllocationService(Engine(), journal, Extractor(), limits)
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


def _count_lookups(journal: PostgresJournal) -> list[str]:
    """The users the journal is asked for from now on (`stored_latest`), in order."""
    asked: list[str] = []
    stored_latest = journal.stored_latest

    async def counted(experiment: Experiment, user_ids: Sequence[str]) -> dict[str, Assignment]:
        asked.extend(user_ids)
        return await stored_latest(experiment, user_ids)

    journal.stored_latest = counted  # type: ignore[method-assign]
    return asked


async def _batch(servicer: AllocatorServicer, users: Sequence[str]) -> list[tuple[str, bool]]:
    """(assignment id, sticky) of each user of one `AllocateBatch` of the sticky experiment."""
    batch = pb.AllocateBatchRequest(
        requests=[pb.AllocateRequest(experiment_id="sticky", user_id=u) for u in users]
    )
    reply = pb.AllocateBatchResponse.FromString(
        await servicer.AllocateBatchBytes(batch.SerializeToString(), None)  # type: ignore[arg-type]
    )
    return [(r.allocation.assignment_id, r.allocation.sticky) for r in reply.results]


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
    got = await _batch(servicer, [f"user-{i}" for i in range(2, 8)])
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
    # A user never seen is still new, without a lookup in PostgreSQL but for the filter's
    # few false passes: 500 of them in batches (of as many as the write-behind takes at
    # once), and one alone.
    lookups = _count_lookups(journal)
    for start in range(0, 500, HELD // 2):
        new_users = [f"new-{i}" for i in range(start, start + HELD // 2)]
        assert not any(sticky for _, sticky in await _batch(servicer, new_users))
        await journal.flush()
    assert len(lookups) < 10, lookups
    lookups.clear()
    new = await service.allocate(AllocationRequest("sticky", "someone-else"))
    assert not new.sticky
    # Evicted users are still looked up, each once.
    again = await service.allocate(AllocationRequest("sticky", "user-12"))
    assert again.sticky and _same(again.assignment, first[12])
    assert "user-12" in lookups
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
    assert loaded["unread"] == 1 and restarted.unlisted_experiments == 1
    assert len(restarted._held) == HELD
    held = [restarted.holds(experiment_key="sticky", user_id=f"user-{i}") for i in range(3 * HELD)]
    assert held == [False] * (2 * HELD) + [True] * HELD
    # Held as they were made (read back through a binary COPY stream), but for the time.
    for a in first[-HELD:]:
        again = restarted._latest_of((a.handle, a.user_id))
        assert again is not None and _same(again, a), (again, a)
    # "sticky" has rows it did not read: until its stored users are listed, every user not
    # held is looked up in PostgreSQL, even one never seen.
    lookups = _count_lookups(journal)
    assert not (await restarted.allocate(AllocationRequest("sticky", "never-seen"))).sticky
    assert lookups == ["never-seen"]
    lookups.clear()
    # Listed (3 * HELD rows, the held ones too): then only users stored may be looked up.
    await restarted.list_stored_users(journal.list_users)
    assert restarted.unlisted_experiments == 0
    for i in range(200):
        await restarted.allocate(AllocationRequest("sticky", f"new-{i}"))
        if i % 10 == 9:
            await journal.flush()
    assert len(lookups) < 5, lookups  # about one in a few hundred passes the filter
    lookups.clear()
    # Users only PostgreSQL holds keep their assignments: unary, and a conversion by id.
    again = await restarted.allocate(AllocationRequest("sticky", "user-0"))
    assert again.sticky and _same(again.assignment, first[0])
    assert lookups == ["user-0"]
    (converted,) = await restarted.record_conversions(
        [ConversionRequest(assignment_id=first[HELD].id)]
    )
    assert not isinstance(converted, Exception) and _same(converted.assignment, first[HELD])
    await journal.close()
    # With no bound, a restart reads them all (and the 201 new users' since), none unread.
    journal = PostgresJournal(store)
    unbounded = AllocationService(Engine(), journal, Extractor())
    loaded = await server.restore(journal, unbounded)
    assert (loaded["assignments"], loaded["unread"]) == (3 * HELD + 201, 0)
    assert all(unbounded.holds(assignment_id=a.id) for a in first)


async def test_a_full_filter_of_evicted_users_is_renewed_from_postgres(
    store: PostgresStore,
) -> None:
    # Its parts hold at least 32 keys each: 992 evicted users fill it. Large flushes are
    # written as blocks, so the listing reads blocks and rows.
    journal = PostgresJournal(store, max_pending_assignments=10_000, block_min_rows=300)
    service = await _service(journal, Limits(max_held_assignments=HELD, evicted_filter_keys=1))
    servicer = AllocatorServicer(service, "local")
    users = [f"user-{i}" for i in range(1_200)]
    first = await _batch(servicer, users[:600])
    await journal.flush()  # a block
    first += await _batch(servicer, users[600:650])
    await journal.flush()  # rows
    first += await _batch(servicer, users[650:])  # not written yet: the renewal flushes them
    assert service.held_statistics()["evicted_filter_full"] == 1
    # Full: every user not held is looked up, never-seen ones too.
    lookups = _count_lookups(journal)
    assert not any(sticky for _, sticky in await _batch(servicer, ["new-0", "new-1"]))
    assert {"new-0", "new-1"} <= set(lookups)

    # A renewal whose flush fails leaves the experiment unlisted (looked up, as when full)
    # and goes on at the next call, though the new filter is no longer full.
    class Unflushed:
        async def flushed(self) -> bool:
            return False

        list_stored = journal.list_stored

    with pytest.raises(Unavailable, match="not written"):
        await service.renew_evicted_filter(Unflushed())
    statistics = service.held_statistics()
    assert statistics["evicted_filter_full"] == 0 and statistics["unlisted_experiments"] == 1
    await service.renew_evicted_filter(journal)
    statistics = service.held_statistics()
    assert statistics["evicted_filter_full"] == 0 and statistics["unlisted_experiments"] == 0
    assert journal.stats.blocks_written >= 1 and journal.stats.pending_assignments == 0
    # Never-seen users: new, and looked up only on the filter's few false passes.
    lookups.clear()
    for start in range(0, 400, 100):
        new = [f"new-{i}" for i in range(start + 2, start + 102)]
        assert not any(sticky for _, sticky in await _batch(servicer, new))
    assert len(lookups) < 10, lookups
    # Every user made before, evicted (in the block, in rows, or flushed by the renewal):
    # the same assignment again (in batches memory can hold again at once).
    step = HELD // 2
    for start in range(0, 1_200, step):
        again = await _batch(servicer, users[start : start + step])
        assert again == [(i, True) for i, _ in first[start : start + step]]
    # Not full: nothing more to do.
    await service.renew_evicted_filter(journal)
    assert service.held_statistics()["unlisted_experiments"] == 0


async def test_a_batch_with_more_evicted_users_than_memory_holds_answers_each_from_postgres(
    store: PostgresStore,
) -> None:
    journal = PostgresJournal(store)
    service = await _service(journal)
    first = await _first_users(service, journal, 3 * HELD)
    await journal.flush()
    # 2 * HELD evicted users in one batch: more than memory holds, all found in PostgreSQL.
    servicer = AllocatorServicer(service, "local")
    users = range(2 * HELD)
    got = await _batch(servicer, [f"user-{i}" for i in users])
    assert got == [(first[i].id, True) for i in users]
    assert len(service._held) <= HELD
    await journal.close()
