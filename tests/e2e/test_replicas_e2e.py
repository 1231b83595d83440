"""Two replicas (two server processes) sharing one PostgreSQL and one Redis: learning on one
changes the allocations of the other within 2 s, sticky assignments agree, and the counts in
PostgreSQL are the sum of what both answered.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import grpc
import pytest
import redis
from counters_support import (
    CONTEXTS,
    allocate,
    assert_conversion_counters_match_rows,
    convert,
    counters,
    experiment,
    global_counts,
)
from e2e_support import SEEN_S, Launcher, Server, query, wait_for

from allocsvc._proto import allocsvc_pb2 as pb

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 10.0
# The spec's bound for a conversion on one replica to change the allocations of another.
PROPAGATION_S = 2.0


def allocate_many(server: Server, key: str, users: list[str]) -> list[Any]:
    reply = server.allocator.AllocateBatch(
        pb.AllocateBatchRequest(
            requests=[
                pb.AllocateRequest(experiment_id=key, user_id=u, channel="web", context=CONTEXTS[0])
                for u in users
            ]
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert all(r.HasField("allocation") for r in reply.results), reply
    return [r.allocation for r in reply.results]


def test_two_replicas_share_learning_sticky_assignments_and_counts(
    fresh_db: str, fresh_redis: str, launcher: Launcher
) -> None:
    # Started together: they also race to migrate the new database.
    one, two = launcher.start_together(2, "--postgres-dsn", fresh_db, "--redis-url", fresh_redis)
    answers: list[Any] = []  # every Allocate answer of both replicas
    one.admin.CreateExperiment(experiment("shared", ("A", "B")), timeout=RPC_TIMEOUT_S)
    two.admin.CreateExperiment(
        experiment("sticky", ("A", "B", "C"), segment_by=("source", "device")),
        timeout=RPC_TIMEOUT_S,
    )
    wait_for("replica two sees 'shared'", lambda: two.knows("shared"), timeout=SEEN_S)
    wait_for("replica one sees 'sticky'", lambda: one.knows("sticky"), timeout=SEEN_S)

    # Sticky: a user first seen by one replica gets the same assignment from the other.
    for i in range(60):
        first, second = (one, two) if i % 2 else (two, one)
        user, context = f"user-{i}", CONTEXTS[i % len(CONTEXTS)]
        earlier = allocate(first, "sticky", user, context)
        again = allocate(second, "sticky", user, context)
        assert (again.assignment_id, again.variant_id) == (
            earlier.assignment_id,
            earlier.variant_id,
        )
        assert not earlier.sticky and again.sticky
        answers += [earlier, again]

    # Sticky also when both replicas see a new user at the same moment.
    racers = [f"racer-{i}" for i in range(100)]
    raced: dict[int, list[Any]] = {}
    barrier = threading.Barrier(2)

    def race(index: int, server: Server) -> None:
        barrier.wait(timeout=RPC_TIMEOUT_S)
        raced[index] = [allocate(server, "sticky", u, CONTEXTS[0]) for u in racers]

    threads = [threading.Thread(target=race, args=(i, s)) for i, s in enumerate((one, two))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert set(raced) == {0, 1}
    for a, b in zip(raced[0], raced[1], strict=True):
        assert (a.assignment_id, a.variant_id) == (b.assignment_id, b.variant_id)
    answers += raced[0] + raced[1]

    # Learning: B converts every time on replica one ...
    conversions = 0
    learners = allocate_many(one, "shared", [f"learner-{i}" for i in range(200)])
    answers += learners
    for answer in learners:
        if answer.variant_id == "B":
            assert convert(one, assignment_id=answer.assignment_id).counted
            conversions += 1
    last_ack = time.monotonic()
    assert conversions >= 60
    # ... and within 2 s replica two gives B to at least 90% of new users. Before it learns,
    # it splits about evenly: 45 of 50 then happens with probability ~2e-9.
    shares = []
    probe = 0
    while True:
        probes = allocate_many(two, "shared", [f"probe-{probe}-{i}" for i in range(50)])
        answers += probes
        probe += 1
        shares.append(sum(a.variant_id == "B" for a in probes) / len(probes))
        if shares[-1] >= 0.9:
            break
        assert time.monotonic() - last_ack < PROPAGATION_S, f"B shares on replica two: {shares}"
        time.sleep(0.05)

    assert one.stop() == 0
    assert two.stop() == 0
    # Every allocation answered as new was counted once, whichever replica made it.
    state = counters(fresh_db)
    for key, names in (("shared", "AB"), ("sticky", "ABC")):
        new = {a.assignment_id: a for a in answers if a.experiment_id == key and not a.sticky}
        made = Counter(names.index(a.variant_id) for a in new.values())
        counted = {v: c[0] for v, c in global_counts(state, key).items()}
        assert counted == dict(made), key
        stored = query(
            fresh_db,
            "SELECT count(*) FROM assignments a JOIN experiments e ON e.id = a.experiment_id"
            " WHERE e.key = $1",
            key,
        )[0][0]
        assert stored == len(new)
    assert sum(c[1] for c in global_counts(state, "shared").values()) == conversions
    assert assert_conversion_counters_match_rows(fresh_db, "shared") == conversions


def test_a_conversion_by_id_finds_another_replica_s_assignment_redis_does_not_hold(
    fresh_db: str, fresh_redis: str, launcher: Launcher
) -> None:
    # Redis lost the assignment's record (it was down when the replica made it, or the replica
    # dropped its unpushed records): the replica converting it finds it in PostgreSQL.
    one, two = launcher.start_together(2, "--postgres-dsn", fresh_db, "--redis-url", fresh_redis)
    one.admin.CreateExperiment(experiment("byid", ("A", "B")), timeout=RPC_TIMEOUT_S)
    wait_for("replica two sees 'byid'", lambda: two.knows("byid"), timeout=SEEN_S)
    made = allocate_many(one, "byid", [f"byid-{i}" for i in range(3)])
    ids = [a.assignment_id for a in made]
    client = redis.Redis.from_url(fresh_redis)
    try:
        wait_for("the records in Redis", lambda: all(_records(client, i) for i in ids), timeout=5)
        for i in ids:
            client.delete(*_records(client, i))
    finally:
        client.close()
    stored = "SELECT count(*) FROM assignments WHERE id = ANY($1::text[])"
    wait_for("the rows in PostgreSQL", lambda: query(fresh_db, stored, ids)[0][0] == 3, timeout=10)
    for i in ids:
        assert convert(two, assignment_id=i).counted
    with pytest.raises(grpc.RpcError) as missing:
        convert(two, assignment_id="no-such-assignment")
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert one.stop() == 0
    assert two.stop() == 0
    assert assert_conversion_counters_match_rows(fresh_db, "byid") == 3


def _records(client: redis.Redis, assignment_id: str) -> list[bytes]:
    return list(client.scan_iter(match=f"*:asg:{assignment_id}"))
