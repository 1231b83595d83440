"""A shared replica publishes a batch's new assignments to Redis in one script call built in
Rust (`MadeAssignments.shared_records`), not a command each: another replica finds each by id
as it was made, erasure finds and drops the ones not pushed yet (also those a push under way
holds), and more than one call's worth is all written, also after a push was cancelled half
way."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Sequence

import pytest
import redis.asyncio as aioredis
from batch_support import Keeping, redis_shared, servicer
from redis.exceptions import RedisError

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import AssignmentPart
from allocsvc.allocation.service import AllocationRequest, AllocationService, Assignment
from allocsvc.api.allocator import AllocatorServicer
from allocsvc.core import MadeAssignments
from allocsvc.store import redis as shared_redis
from allocsvc.store.pump import CountRow, DeltaPump
from allocsvc.store.redis import ASSIGNMENT_TTL_SECONDS, RedisShared

pytestmark = pytest.mark.integration

# User ids JSON must escape, and some it need not.
AWKWARD = ['quote"d', "back\\slash", "new\nline", "tab\tand\x01control", "ünï 😀", "plain"]
_namespaces = itertools.count()


async def _replica(url: str) -> tuple[RedisShared, AllocationService, Keeping, AllocatorServicer]:
    shared = redis_shared(url, f"batches-{next(_namespaces)}")
    journal = Keeping()
    service, api = await servicer(journal, shared)
    return shared, service, journal, api


async def _batch(api: AllocatorServicer, users: list[str]) -> None:
    request = pb.AllocateBatchRequest(
        requests=[
            pb.AllocateRequest(experiment_id="e", user_id=u, context={"country": "us"})
            for u in users
        ]
    )
    await api.AllocateBatchBytes(request.SerializeToString(), None)  # type: ignore[arg-type]


async def _stored_ids(url: str, namespace: str) -> set[str]:
    client = aioredis.Redis.from_url(url)
    try:
        prefix = f"{namespace}:asg:"
        return {key.decode()[len(prefix) :] async for key in client.scan_iter(match=f"{prefix}*")}
    finally:
        await client.aclose()


async def test_another_replica_finds_each_of_a_batch_s_assignments_by_id(fresh_redis: str) -> None:
    shared, service, journal, api = await _replica(fresh_redis)
    other = redis_shared(fresh_redis, shared._ns)
    try:
        await _batch(api, [*AWKWARD, *(f"u{i}" for i in range(200))])
        single = await service.allocate(AllocationRequest("e", 'single\\"one'))
        await shared.push()
        made = [Assignment._make(t) for m in journal.made for t in m.assignments()]
        assert len(made) == len(AWKWARD) + 200
        assert {a.user_id for a in made} >= set(AWKWARD)
        for a in [*made, single.assignment]:
            assert await other.assignment(a.id) == a
        client = aioredis.Redis.from_url(fresh_redis)
        try:
            ttl = await client.ttl(f"{shared._ns}:asg:{made[0].id}")
        finally:
            await client.aclose()
        assert 0 < ttl <= ASSIGNMENT_TTL_SECONDS
    finally:
        await shared.close()
        await other.close()


async def test_erasure_finds_and_drops_a_batch_s_assignments_not_pushed_yet(
    fresh_redis: str,
) -> None:
    shared, _, journal, api = await _replica(fresh_redis)
    try:
        await _batch(api, ["gone", "kept-1", "kept-2"])
        [made] = journal.made
        by_user = {t[3]: t[0] for t in made.assignments()}
        handle = made.assignments()[0][2]
        found = await shared.user_keys("gone", [handle])
        assert list(found) == [f"{shared._ns}:asg:{by_user['gone']}"]
        assert await shared.erase_user("gone", [handle]) == 1
        await shared.push()
        assert await _stored_ids(fresh_redis, shared._ns) == {by_user["kept-1"], by_user["kept-2"]}
    finally:
        await shared.close()


async def test_batches_past_one_script_call_are_all_written(
    fresh_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_redis, "_RECORDS_PER_CALL", 250)
    shared, _, journal, api = await _replica(fresh_redis)
    try:
        for b in range(3):
            await _batch(api, [f"b{b}-{i}" for i in range(200)])
        await shared.push()
        ids = {t[0] for m in journal.made for t in m.assignments()}
        assert len(ids) == 600
        assert await _stored_ids(fresh_redis, shared._ns) == ids
    finally:
        await shared.close()


class _Pipelines(RedisShared):
    """Notes the records of each pipeline a push writes; fails the pipelines numbered in
    `failing` (from 0) with a Redis error before they are sent."""

    def __init__(self, url: str, namespace: str, failing: set[int]) -> None:
        super().__init__(url, namespace=namespace)
        self.bind(DeltaPump(list), lambda rows: None, lambda handle: [], list, lambda h: None)
        self.failing = failing
        self.written: list[int] = []

    async def _write(self, rows: list[CountRow], parts: list[AssignmentPart]) -> None:
        number = len(self.written)
        self.written.append(0)
        if number in self.failing:
            raise RedisError("injected")
        await super()._write(rows, parts)
        self.written[number] = sum(n for _, _, n in parts)


@pytest.fixture
def small_pipelines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_redis, "_RECORDS_PER_CALL", 50)
    monkeypatch.setattr(shared_redis, "_CALLS_PER_PIPELINE", 2)


@pytest.mark.usefixtures("small_pipelines")
async def test_a_backlog_is_written_in_pipelines_of_bounded_size(fresh_redis: str) -> None:
    # A push of everything at once, after a burst of batches, outlasted the client's timeout,
    # and each retry was larger (bench/RESULTS.md item 39).
    shared, service, journal, api = await _replica(fresh_redis)
    pipelines = _Pipelines(fresh_redis, shared._ns, failing=set())
    try:
        singles = [
            (await service.allocate(AllocationRequest("e", f"s{i}"))).assignment for i in range(30)
        ]
        for b in range(8):
            await _batch(api, [f"b{b}-{i}" for i in range(40)])
        for a in singles:
            pipelines.assignment_made(a)
        for made in journal.made:
            pipelines.assignments_made(made)
        await pipelines.push()
        # Parts of about 50: the 30 singles, then whole batches of 40 (one part each past 50).
        assert len(pipelines.written) == 5
        assert all(n <= 2 * 80 for n in pipelines.written)
        assert sum(pipelines.written) == 30 + 8 * 40
        ids = {a.id for a in singles} | {t[0] for m in journal.made for t in m.assignments()}
        assert await _stored_ids(fresh_redis, shared._ns) >= ids
    finally:
        await shared.close()
        await pipelines.close()


@pytest.mark.usefixtures("small_pipelines")
async def test_a_push_failing_half_way_keeps_only_what_it_did_not_write(fresh_redis: str) -> None:
    shared, _, journal, api = await _replica(fresh_redis)
    pipelines = _Pipelines(fresh_redis, shared._ns, failing={1})
    try:
        for b in range(6):
            await _batch(api, [f"f{b}-{i}" for i in range(50)])
        for made in journal.made:
            pipelines.assignments_made(made)
        with pytest.raises(RedisError):
            await pipelines.push()
        assert pipelines.written == [100, 0]
        await pipelines.push()
        # The rest, each record once: the first pipeline's are not written again.
        assert pipelines.written == [100, 0, 100, 100]
        ids = {t[0] for m in journal.made for t in m.assignments()}
        assert await _stored_ids(fresh_redis, shared._ns) == ids
    finally:
        await shared.close()
        await pipelines.close()


async def test_records_past_the_bound_are_dropped_oldest_first(
    fresh_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    shared, service, journal, api = await _replica(fresh_redis)
    bounded = RedisShared(fresh_redis, namespace=shared._ns, max_pending_records=100)
    bounded.bind(DeltaPump(list), lambda rows: None, lambda handle: [], list, lambda h: None)
    try:
        for b in range(3):
            await _batch(api, [f"d{b}-{i}" for i in range(40)])
        singles = [
            (await service.allocate(AllocationRequest("e", f"s{i}"))).assignment for i in range(30)
        ]
        for made in journal.made:
            bounded.assignments_made(made)
        for a in singles:
            bounded.assignment_made(a)
        assert bounded.pending_records == 150
        bounded._bound_pending()
        # The two oldest batches go (80 records, for the 50 too many); the newest and the
        # singles stay.
        assert bounded.statistics() == {"pending_records": 70, "dropped_records": 80}
        await bounded.push()
        kept = {a.id for a in singles} | {t[0] for t in journal.made[2].assignments()}
        assert await _stored_ids(fresh_redis, shared._ns) == kept
        for a in singles:
            bounded.assignment_made(a)
        bounded._max_pending_records = 10
        bounded._bound_pending()
        assert bounded.statistics() == {"pending_records": 10, "dropped_records": 100}
        # Said once, not at each check (the sync loop's push that succeeds resets it).
        dropped = [r for r in caplog.records if r.getMessage().startswith("assignment records")]
        assert len(dropped) == 1
    finally:
        await shared.close()
        await bounded.close()


class _SlowRecords(RedisShared):
    """Builds its records slowly, so that a push can be cancelled while it waits for them."""

    def _records(self, parts: Sequence[AssignmentPart]) -> list[bytes]:
        time.sleep(0.5)  # on the push's worker thread
        return super()._records(parts)


async def test_a_cancelled_push_keeps_the_batch_for_the_next(fresh_redis: str) -> None:
    shared, _, journal, api = await _replica(fresh_redis)
    slow = _SlowRecords(fresh_redis, namespace=shared._ns)
    slow.bind(DeltaPump(list), lambda rows: None, lambda handle: [], list, lambda healthy: None)
    try:
        await _batch(api, [f"c{i}" for i in range(50)])
        [made] = journal.made
        slow.assignments_made(made)
        pushing = asyncio.create_task(slow.push())
        await asyncio.sleep(0.1)
        pushing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pushing
        await slow.push()
        ids = {t[0] for t in made.assignments()}
        assert await _stored_ids(fresh_redis, shared._ns) == ids
    finally:
        await shared.close()
        await slow.close()


async def _slow_replica(
    url: str, users: list[str]
) -> tuple[RedisShared, _SlowRecords, MadeAssignments]:
    """A replica's shared state, and beside it one whose pushes build their records slowly,
    with a batch of `users` made by the replica pending."""
    shared, _, journal, api = await _replica(url)
    slow = _SlowRecords(url, namespace=shared._ns)
    slow.bind(DeltaPump(list), lambda rows: None, lambda handle: [], list, lambda healthy: None)
    await _batch(api, users)
    [made] = journal.made
    slow.assignments_made(made)
    return shared, slow, made


@pytest.mark.parametrize("push_ends", ["written", "cancelled"])
async def test_an_erasure_waits_for_the_push_under_way(fresh_redis: str, push_ends: str) -> None:
    # The push took the batch's records (user "gone" among them) before the erasure began: the
    # erasure must still leave none of the user's behind, whether that push writes them or is
    # cancelled and keeps them for the next.
    shared, slow, made = await _slow_replica(fresh_redis, ["gone", "kept-1", "kept-2"])
    by_user = {t[3]: t[0] for t in made.assignments()}
    handle = made.assignments()[0][2]
    try:
        pushing = asyncio.create_task(slow.push())
        await asyncio.sleep(0.1)  # the push is building its records on a thread
        erasing = asyncio.create_task(slow.erase_user("gone", [handle]))
        await asyncio.sleep(0.1)
        assert not erasing.done()  # it waits for the push
        if push_ends == "cancelled":
            pushing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pushing
        assert await erasing == 1
        await slow.push()
        assert await _stored_ids(fresh_redis, slow._ns) == {by_user["kept-1"], by_user["kept-2"]}
    finally:
        await shared.close()
        await slow.close()
