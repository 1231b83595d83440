"""A replica sharing state through Redis finishes a batch of a sticky experiment in two round
trips (one HMGET per experiment for the users it does not hold, one script call claiming the
new ones), not two per user: answers, counts and what is kept are what `allocate` gives, across
replicas, when another replica claims a user between the two, and when Redis is away. Unary
calls take one round trip per new user, concurrent calls' claims in one script call, and none
for a user the replica holds (answered by the one Rust call of the wire path)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
import redis.asyncio as aioredis
from batch_support import Keeping, redis_shared, servicer

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.service import (
    Allocation,
    AllocationRequest,
    AllocationService,
    Assignment,
    Limits,
)
from allocsvc.api import convert
from allocsvc.api.allocator import AllocatorServicer
from allocsvc.core import MadeAssignments
from allocsvc.errors import ResourceExhausted
from allocsvc.store.redis import RedisShared, _decode

pytestmark = pytest.mark.integration

# User ids JSON must escape, and some it need not.
AWKWARD = ['quote"d', "back\\slash", "new\nline", "tab\tand\x01control", "ünï 😀", "plain"]
_namespaces = itertools.count()


class Replica:
    """A service sharing a namespace of Redis (`Replicas.start`), with sticky experiment "e"
    (and non-sticky "n" when asked)."""

    def __init__(
        self,
        shared: RedisShared,
        service: AllocationService,
        journal: Keeping,
        api: AllocatorServicer,
    ) -> None:
        self.shared, self.service, self.journal, self.api = shared, service, journal, api

    async def batch(self, items: Sequence[tuple[str, str]]) -> list[pb.AllocateResponse]:
        """(experiment, user) items, in one AllocateBatch; every item must be answered."""
        request = pb.AllocateBatchRequest(
            requests=[
                pb.AllocateRequest(experiment_id=e, user_id=u, context={"country": "us"})
                for e, u in items
            ]
        )
        raw = await self.api.AllocateBatchBytes(request.SerializeToString(), None)  # type: ignore[arg-type]
        results = pb.AllocateBatchResponse.FromString(raw).results
        assert [r.WhichOneof("outcome") for r in results] == ["allocation"] * len(items)
        return [r.allocation for r in results]

    def kept(self) -> list[Assignment]:
        return [Assignment._make(t) for m in self.journal.made for t in m.assignments()]

    def allocations(self, key: str = "e") -> int:
        return self.service.allocations(self.service.get_experiment(key).handle)


class Replicas:
    """Replicas sharing one fresh namespace of Redis (the `replicas` fixture closes them)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.namespace = f"sticky-{next(_namespaces)}"
        self._shared: list[RedisShared] = []

    async def start(self, *, non_sticky: bool = False, limits: Limits | None = None) -> Replica:
        shared = self.shared()
        journal = Keeping()
        service, api = await servicer(journal, shared, sticky=True, limits=limits)
        if non_sticky:
            n = pb.Experiment(
                id="n",
                status=pb.EXPERIMENT_STATUS_RUNNING,
                variants=[pb.Variant(id="X"), pb.Variant(id="Y")],
                sticky=False,
            )
            await service.create_experiment(convert.experiment_from_pb(n))
        return Replica(shared, service, journal, api)

    def shared(self) -> RedisShared:
        """A connection of its own to the namespace (each replica has one; a test may build a
        service on one itself), closed with the others."""
        shared = redis_shared(self.url, self.namespace)
        self._shared.append(shared)
        return shared

    async def standing(self, handle: int, users: Sequence[str]) -> list[str]:
        """The ids of the users' assignments in the shared sticky hash."""
        client = aioredis.Redis.from_url(self.url)
        try:
            raw = await client.hmget(f"{self.namespace}:{{x{handle}}}:sticky", list(users))
        finally:
            await client.aclose()
        return [a.id if (a := _decode(r)) is not None else "" for r in raw]

    async def close(self) -> None:
        for shared in self._shared:
            await shared.close()


@pytest.fixture
async def replicas(fresh_redis: str) -> AsyncIterator[Replicas]:
    started = Replicas(fresh_redis)
    yield started
    await started.close()


async def _unary(replica: Replica, user: str) -> pb.AllocateResponse:
    """One unary Allocate of `user` in "e", on the wire format, as the server answers it."""
    request = pb.AllocateRequest(experiment_id="e", user_id=user, context={"country": "us"})
    raw = await replica.api.AllocateBytes(request.SerializeToString(), None)  # type: ignore[arg-type]
    return pb.AllocateResponse.FromString(raw)


async def test_a_batch_claims_its_new_users_and_another_replica_answers_them_the_same(
    replicas: Replicas,
) -> None:
    first = await replicas.start(non_sticky=True)
    second = await replicas.start()
    users = [*AWKWARD, *(f"u{i}" for i in range(300))]
    # A repeated user gets the first answer; the non-sticky experiment is not claimed.
    items = [("e", u) for u in users] + [("e", "u0"), ("n", "u1")]
    answers = await first.batch(items)
    assert not any(a.sticky for a in answers[: len(users)])
    assert answers[len(users)].sticky
    assert answers[len(users)].assignment_id == answers[users.index("u0")].assignment_id
    handle = first.service.get_experiment("e").handle
    ids = [a.assignment_id for a in answers[: len(users)]]
    assert await replicas.standing(handle, users) == ids
    n_handle = first.service.get_experiment("n").handle
    assert await replicas.standing(n_handle, ["u1"]) == [""]
    # Counted and kept once each, the non-sticky item too.
    assert first.allocations() == len(users)
    assert first.allocations("n") == 1
    assert sorted(a.id for a in first.kept()) == sorted([*ids, answers[-1].assignment_id])
    for user, answer in zip(users, answers, strict=False):
        assert first.service.holds(experiment_key="e", user_id=user)
        held = first.service.user_assignments(user)
        assert answer.assignment_id in {a.id for a in held}

    # Another replica answers those users with the first's assignments, claims its new ones.
    later = [*users[::2], *(f"new{i}" for i in range(50))]
    again = await second.batch([("e", u) for u in later])
    by_user = dict(zip(users, answers, strict=False))
    for user, answer in zip(later, again, strict=True):
        if user in by_user:
            assert answer.sticky
            assert (answer.assignment_id, answer.variant_id, answer.segment_key) == (
                by_user[user].assignment_id,
                by_user[user].variant_id,
                by_user[user].segment_key,
            )
        else:
            assert not answer.sticky
    assert second.allocations() == 50
    assert {a.user_id for a in second.kept()} == {f"new{i}" for i in range(50)}
    # And the first finds the second's new users there too, one by one.
    one = await first.service.allocate(AllocationRequest("e", "new7"))
    assert one.sticky
    assert one.assignment.id == again[later.index("new7")].assignment_id


async def test_a_claim_another_replica_won_meanwhile_is_answered_with_what_stands(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await replicas.start()
    second = await replicas.start()
    contested = ["c1", 'c"2']
    won: dict[str, Assignment] = {}
    claim: Callable[[MadeAssignments, set[int]], Awaitable[dict[int, Assignment]]]
    claim = first.shared.claim_made  # type: ignore[assignment]

    async def late_claim(made: MadeAssignments, sticky: set[int]) -> dict[int, Assignment]:
        # The first looked these users up (none) and decided; the second answers them
        # before the first's claims arrive.
        for user in contested:
            won[user] = (await second.service.allocate(AllocationRequest("e", user))).assignment
        return await claim(made, sticky)

    monkeypatch.setattr(first.shared, "claim_made", late_claim)
    users = ["a", "c1", "b", 'c"2', "c1", "d"]
    answers = await first.batch([("e", u) for u in users])
    assert len(won) == 2
    for user, answer in zip(users, answers, strict=True):
        if user in won:
            assert answer.sticky
            assert (answer.assignment_id, answer.variant_id) == (
                won[user].id,
                ("A", "B", "C")[won[user].variant],
            )
        else:
            assert not answer.sticky
    # Only the claims that stood count, are held and kept; the contested users' latest
    # assignment here is the second's.
    assert first.allocations() == 3
    assert sorted(a.user_id for a in first.kept()) == ["a", "b", "d"]
    for user in contested:
        assert [a.id for a in first.service.user_assignments(user)] == [won[user].id]
    handle = first.service.get_experiment("e").handle
    assert await replicas.standing(handle, users) == [a.assignment_id for a in answers]
    # Ids were not reused: the next batch's are new.
    later = await first.batch([("e", "z")])
    assert later[0].assignment_id not in {a.assignment_id for a in answers}


async def test_without_redis_a_batch_claims_locally() -> None:
    # Nothing listens on port 1: the replica serves from memory, as `allocate` does.
    shared = redis_shared("redis://127.0.0.1:1", "away")
    journal = Keeping()
    service, api = await servicer(journal, shared, sticky=True)
    replica = Replica(shared, service, journal, api)
    try:
        answers = await replica.batch([("e", u) for u in ["x", "y", "x"]])
        assert not shared.healthy
        assert [a.sticky for a in answers] == [False, False, True]
        assert replica.allocations() == 2
        assert sorted(a.user_id for a in replica.kept()) == ["x", "y"]
        again = await replica.batch([("e", "y")])
        assert again[0].sticky
        assert again[0].assignment_id == answers[1].assignment_id
    finally:
        await shared.close()


# Unary calls: one round trip per new user (the claim answers another replica's assignment
# when there is one), concurrent calls' claims in one script call.


async def _allocate_all(replica: Replica, users: Sequence[str]) -> list[Allocation]:
    return list(
        await asyncio.gather(*(replica.service.allocate(AllocationRequest("e", u)) for u in users))
    )


async def test_concurrent_unary_calls_claim_together_and_another_replica_answers_the_same(
    replicas: Replicas,
) -> None:
    first = await replicas.start()
    second = await replicas.start()
    users = [*AWKWARD, *(f"u{i}" for i in range(60))]
    # The same new user twice at once: one claim stands, both calls answer it.
    answers = await _allocate_all(first, [*users, "u0"])
    assert first.shared._claims.rounds <= 2
    assert answers[-1].assignment.id == answers[len(AWKWARD)].assignment.id
    assert [a.sticky for a in answers[:-1]] == [False] * len(users)
    assert answers[-1].sticky
    handle = first.service.get_experiment("e").handle
    ids = [a.assignment.id for a in answers[: len(users)]]
    assert await replicas.standing(handle, users) == ids
    # Counted once each; each findable by id from the other replica.
    assert first.allocations() == len(users)
    for a in answers[:-1]:
        assert await second.shared.assignment(a.assignment.id) == a.assignment

    mixed = [*users[::3], *(f"new{i}" for i in range(20))]
    again = await _allocate_all(second, mixed)
    by_user = {a.assignment.user_id: a.assignment for a in answers}
    for user, answer in zip(mixed, again, strict=True):
        assert answer.sticky is (user in by_user)
        if user in by_user:
            assert answer.assignment == by_user[user]
            assert second.service.holds(assignment_id=answer.assignment.id)
    # Only the claims that stood count here.
    assert second.allocations() == 20


@pytest.mark.parametrize("wire", [False, True], ids=["allocate", "wire"])
async def test_a_unary_call_cancelled_during_its_claim_keeps_what_stands(
    replicas: Replicas, wire: bool
) -> None:
    first = await replicas.start()
    call = asyncio.create_task(
        _unary(first, "gone") if wire else first.service.allocate(AllocationRequest("e", "gone"))
    )
    await asyncio.sleep(0)  # the claim is on its way
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    handle = first.service.get_experiment("e").handle
    for _ in range(100):
        [standing] = await replicas.standing(handle, ["gone"])
        if standing and first.service.holds(experiment_key="e", user_id="gone"):
            break
        await asyncio.sleep(0.02)
    assert standing
    # The claim stands in Redis: so it is counted and held here, as that assignment.
    assert [a.id for a in first.service.user_assignments("gone")] == [standing]
    assert first.allocations() == 1


async def test_a_unary_call_of_a_sticky_user_the_replica_holds_is_answered_in_rust(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await replicas.start()
    second = await replicas.start()
    calls: list[AllocationRequest] = []

    def counting(replica: Replica) -> None:
        allocate = replica.service.allocate

        async def counted(request: AllocationRequest) -> Allocation:
            calls.append(request)
            return await allocate(request)

        monkeypatch.setattr(replica.service, "allocate", counted)

    counting(first)
    counting(second)
    handle = first.service.get_experiment("e").handle
    new = await _unary(first, "back")
    # A new user: the Python way, which claims it in Redis.
    assert (len(calls), first.shared._claims.rounds, new.sticky) == (1, 1, False)
    assert await replicas.standing(handle, ["back"]) == [new.assignment_id]
    again = await _unary(first, "back")
    # Held here: answered by the one Rust call, with no claim and no `allocate`.
    assert (len(calls), first.shared._claims.rounds) == (1, 1)
    assert again.sticky
    again.sticky = False
    assert again == new
    # The other replica does not hold it: its Python way finds the claim that stands...
    other = await _unary(second, "back")
    assert len(calls) == 2
    assert (other.assignment_id, other.variant_id, other.sticky) == (
        new.assignment_id,
        new.variant_id,
        True,
    )
    # ...and holds it, so the next call there is answered in Rust too.
    assert await _unary(second, "back") == other
    assert (len(calls), second.shared._claims.rounds) == (2, 1)
    assert (first.allocations(), second.allocations()) == (1, 0)


class _Full(Keeping):
    """A write-behind buffer with no room: new assignments are refused."""

    def has_room(self, n: int) -> bool:
        return False

    def admit(self, n: int) -> None:
        raise ResourceExhausted("write-behind buffer full")


async def test_a_full_replica_still_answers_users_another_replica_claimed(
    replicas: Replicas,
) -> None:
    first = await replicas.start()
    shared = replicas.shared()
    service, _ = await servicer(_Full(), shared, sticky=True)
    earlier = (await first.service.allocate(AllocationRequest("e", "known"))).assignment
    answer = await service.allocate(AllocationRequest("e", "known"))
    assert answer.sticky
    assert answer.assignment == earlier
    with pytest.raises(ResourceExhausted):
        await service.allocate(AllocationRequest("e", "unknown"))


async def test_a_batch_finds_more_claimed_users_than_its_memory_holds(replicas: Replicas) -> None:
    first = await replicas.start()
    # Memory for 10: the 30 users found in Redis are held in turn, evicting one another.
    second = await replicas.start(limits=Limits(max_held_assignments=10))
    users = [f"u{i}" for i in range(30)]
    answers = await first.batch([("e", u) for u in users])
    admitted: list[int] = []
    second.journal.admit = admitted.append  # type: ignore[method-assign]
    again = await second.batch([("e", u) for u in users])
    assert [(a.assignment_id, a.sticky) for a in again] == [
        (a.assignment_id, True) for a in answers
    ]
    # Answered as found, none decided anew (for a claim that would lose).
    assert admitted == [0]
    assert second.allocations() == 0
    assert not second.kept()
