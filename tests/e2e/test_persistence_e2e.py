"""Durability against the real server process on a real PostgreSQL: a graceful restart keeps
every counter, sticky assignment and idempotency key (past the memory bound too: the users it
does not read back are listed in the background); a restart after batch load reads the
assignments still in blocks without expanding them; a SIGKILL under load loses no
acknowledged conversion and counts none twice.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from counters_support import (
    CONTEXTS,
    allocate,
    assert_conversion_counters_match_rows,
    convert,
    counters,
    experiment,
    global_counts,
)
from e2e_support import STOP_TIMEOUT_S, Launcher, query, wait_for

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 10.0


# Restart ------------------------------------------------------------------------------------


def test_graceful_restart_keeps_counters_sticky_assignments_and_idempotency(
    fresh_db: str, launcher: Launcher
) -> None:
    first = launcher.start("--postgres-dsn", fresh_db, "--seed", "11")
    first.admin.CreateExperiment(
        experiment("shop", ("A", "B", "C"), segment_by=("source", "device")), timeout=RPC_TIMEOUT_S
    )
    first.admin.CreateExperiment(experiment("flat", ("A", "B")), timeout=RPC_TIMEOUT_S)
    first.admin.CreateExperiment(experiment("learned", ("A", "B")), timeout=RPC_TIMEOUT_S)

    answers: dict[tuple[str, str], Any] = {}
    conversions: list[dict[str, Any]] = []
    for i in range(240):
        user, context = f"user-{i}", CONTEXTS[i % len(CONTEXTS)]
        for key in ("shop", "flat"):
            answers[(key, user)] = allocate(first, key, user, context)
        if i % 3 == 0:
            shop_id = answers[("shop", user)].assignment_id
            conversions.append({"assignment_id": shop_id, "value": 1.5, "idempotency_key": f"o{i}"})
            # the same assignment converting again under another key counts again
            conversions.append({"assignment_id": shop_id, "value": 2.0, "idempotency_key": f"p{i}"})
        if i % 4 == 1:
            conversions.append({"experiment_id": "flat", "user_id": user})
    for request in conversions:
        assert convert(first, **request).counted
        assert not convert(first, **request).counted  # a retry before the restart
    # "learned": variant B converts every time until it dominates.
    for i in range(200):
        answer = allocate(first, "learned", f"learner-{i}", CONTEXTS[0])
        answers[("learned", f"learner-{i}")] = answer
        if answer.variant_id == "B":
            assert convert(first, assignment_id=answer.assignment_id, idempotency_key="k").counted

    # What the clients were told, per experiment and variant: (allocations, conversions, value).
    told: dict[str, dict[int, tuple[int, int, float]]] = {}
    for key, names in (("shop", "ABC"), ("flat", "AB"), ("learned", "AB")):
        made = Counter(names.index(a.variant_id) for (k, _), a in answers.items() if k == key)
        told[key] = {v: (made[v], 0, 0.0) for v in made}
    by_id = {a.assignment_id: (k, a.variant_id) for (k, _), a in answers.items()}
    for request in conversions:
        if "assignment_id" in request:
            key, variant_id = by_id[request["assignment_id"]]
        else:
            key, variant_id = "flat", answers[("flat", request["user_id"])].variant_id
        v = "ABC".index(variant_id)
        a, c, x = told[key][v]
        told[key][v] = (a, c + 1, x + request.get("value", 0.0))
    for (key, _), answer in answers.items():
        if key == "learned" and answer.variant_id == "B":
            a, c, x = told[key][1]
            told[key][1] = (a, c + 1, x)

    def written() -> bool:
        state = counters(fresh_db)
        return all(global_counts(state, key) == told[key] for key in told)

    wait_for("write-behind of the allocation counts", written, timeout=10)
    before = counters(fresh_db)
    assert first.stop() == 0
    assert counters(fresh_db) == before  # the graceful stop flushed nothing twice

    second = launcher.start("--postgres-dsn", fresh_db, "--seed", "12")
    for (key, user), earlier in answers.items():
        again = allocate(second, key, user, CONTEXTS[int(user.rsplit("-", 1)[1]) % 4])
        assert (again.assignment_id, again.variant_id, again.segment_key) == (
            earlier.assignment_id,
            earlier.variant_id,
            earlier.segment_key,
        )
        assert again.sticky
    for request in conversions:
        assert not convert(second, **request).counted
    # The counters came back into memory: new users of "learned" get B.
    fresh = [allocate(second, "learned", f"newcomer-{i}", CONTEXTS[0]) for i in range(100)]
    assert sum(a.variant_id == "B" for a in fresh) >= 90
    assert second.stop() == 0

    after = counters(fresh_db)
    unchanged = {k: c for k, c in before.items() if k[0] != "learned"}
    assert {k: c for k, c in after.items() if k[0] != "learned"} == unchanged
    learned_before = global_counts(before, "learned")
    learned_after = global_counts(after, "learned")
    assert sum(c[0] for c in learned_after.values()) == sum(
        c[0] for c in learned_before.values()
    ) + len(fresh)
    assert {v: c[1] for v, c in learned_after.items()} == {
        v: c[1] for v, c in learned_before.items()
    }
    for key in told:
        assert_conversion_counters_match_rows(fresh_db, key)


def _allocate_retrying(server: Any, key: str, user: str) -> Any:
    """Allocate, waiting out a full write-behind buffer (these tests keep it small)."""
    for _ in range(200):
        try:
            return allocate(server, key, user, CONTEXTS[0])
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            time.sleep(0.05)
    raise AssertionError(f"{user}: write-behind buffer still full after 10 s")


def test_a_restart_past_the_memory_bound_lists_stored_users_and_keeps_them_sticky(
    fresh_db: str, launcher: Launcher
) -> None:
    # Memory for 40 assignments (twice the write-behind's bound); 120 users stored.
    env = {
        "ALLOCSVC_MAX_HELD_ASSIGNMENTS": "40",
        "ALLOCSVC_BACKPRESSURE__MAX_PENDING_ASSIGNMENTS": "20",
    }
    first = launcher.start("--postgres-dsn", fresh_db, env=env)
    request = experiment("bounded", ("A", "B", "C"))
    request.experiment.sticky = True
    first.admin.CreateExperiment(request, timeout=RPC_TIMEOUT_S)
    answers = {f"user-{i}": _allocate_retrying(first, "bounded", f"user-{i}") for i in range(120)}
    launcher.stop(first)

    second = launcher.start("--postgres-dsn", fresh_db, env=env)
    # The restart read the newest 41 and lists every stored user in the background.
    wait_for("stored users listed", lambda: "stored users listed" in second.stderr(), 30)
    listed = [
        json.loads(line) for line in second.stderr().splitlines() if "stored users listed" in line
    ]
    assert [(e["experiment"], e["assignments"]) for e in listed] == [("bounded", 120)]
    # Users memory does not hold keep their assignments; new users are new.
    for user in ("user-0", "user-1", "user-50", "user-119"):
        again = _allocate_retrying(second, "bounded", user)
        assert again.sticky and again.assignment_id == answers[user].assignment_id, user
    assert not _allocate_retrying(second, "bounded", "someone-new").sticky


def _blocked_rows(dsn: str) -> int:
    rows = query(dsn, "SELECT coalesce(sum(rows), 0) AS n FROM assignment_blocks")
    return int(rows[0]["n"])


def test_a_restart_under_batch_load_reads_the_blocks_without_expanding_them(
    fresh_db: str, launcher: Launcher
) -> None:
    # Flushes every 2 s, so a process expands blocks only after 4 s with none written: time
    # enough to kill it with its block unexpanded on a loaded machine (at the default 0.1 s
    # the quiet is 1 s, which the wait for the rows below could use up).
    first = launcher.start("--postgres-dsn", fresh_db, env={"ALLOCSVC_WRITE_BEHIND_INTERVAL": "2"})
    request = experiment("batched", ("A", "B", "C"))
    request.experiment.sticky = True
    first.admin.CreateExperiment(request, timeout=RPC_TIMEOUT_S)
    answers: dict[str, str] = {}

    def batch_request(users: list[str]) -> pb.AllocateBatchRequest:
        return pb.AllocateBatchRequest(
            requests=[
                pb.AllocateRequest(experiment_id="batched", user_id=u, context=CONTEXTS[0])
                for u in users
            ]
        )

    def send(users: list[str], message: pb.AllocateBatchRequest) -> None:
        reply = first.allocator.AllocateBatch(message, timeout=RPC_TIMEOUT_S)
        answers.update(
            (u, r.allocation.assignment_id) for u, r in zip(users, reply.results, strict=True)
        )

    # Bursts of 24 batches of 1,000 at once (made beforehand, so that they arrive within a
    # flush interval or two), until a write-behind flush took 10,000 or more and wrote them as
    # a block; killed at once once the rows stored caught up with the answers.
    for burst in range(8):
        parts = [[f"b{burst}-{k}-{i}" for i in range(1000)] for k in range(24)]
        threads = [threading.Thread(target=send, args=(p, batch_request(p))) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(
            "every answered assignment stored",
            lambda: _blocked_rows(fresh_db) + _stored_rows(fresh_db) == len(answers),
            30,
        )
        if _blocked_rows(fresh_db):
            break
    first.kill()
    in_blocks = _blocked_rows(fresh_db)
    assert in_blocks >= 10_000

    second = launcher.start("--postgres-dsn", fresh_db)
    (loaded,) = [
        json.loads(line) for line in second.stderr().splitlines() if '"state loaded"' in line
    ]
    assert loaded["block_assignments"] == in_blocks and loaded["blocks"] >= 1
    assert loaded["assignments"] == len(answers)
    # Every user keeps its assignment, whether it was read from a block or from a row.
    users = sorted(answers)
    for start in range(0, len(users), 1000):
        part = users[start : start + 1000]
        reply = second.allocator.AllocateBatch(batch_request(part), timeout=RPC_TIMEOUT_S)
        got = {
            u: (r.allocation.assignment_id, r.allocation.sticky)
            for u, r in zip(part, reply.results, strict=True)
        }
        assert got == {u: (answers[u], True) for u in part}


def _stored_rows(dsn: str) -> int:
    return int(query(dsn, "SELECT count(*) AS n FROM assignments")[0]["n"])


# Crash --------------------------------------------------------------------------------------


CRASH_USERS = 2000
KEYS_PER_ASSIGNMENT = 3
CLIENT_THREADS = 8
ACKS_BEFORE_KILL = 1500


@dataclass
class Ledger:
    """What the clients sent and which answers said OK (an OK is a durable promise)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: set[tuple[str, str]] = field(default_factory=set)
    acked: set[tuple[str, str]] = field(default_factory=set)
    acked_at_kill: int = 0
    errors: Counter[str] = field(default_factory=Counter)


def test_sigkill_under_load_loses_no_acknowledged_conversion(
    fresh_db: str, launcher: Launcher
) -> None:
    server = launcher.start("--postgres-dsn", fresh_db, "--seed", "21")
    server.admin.CreateExperiment(
        experiment("crash", ("A", "B", "C"), segment_by=("source", "device")),
        timeout=RPC_TIMEOUT_S,
    )
    assignments: list[str] = []
    for batch in range(CRASH_USERS // 500):
        reply = server.allocator.AllocateBatch(
            pb.AllocateBatchRequest(
                requests=[
                    pb.AllocateRequest(
                        experiment_id="crash",
                        user_id=f"u{batch}-{i}",
                        channel="web",
                        context=CONTEXTS[i % len(CONTEXTS)],
                    )
                    for i in range(500)
                ]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        assignments += [r.allocation.assignment_id for r in reply.results]
    assert len(set(assignments)) == CRASH_USERS
    # Conversions after the crash find their assignments only once those were written.
    wait_for(
        "write-behind of the assignments",
        lambda: query(fresh_db, "SELECT count(*) FROM assignments")[0][0] == CRASH_USERS,
        timeout=10,
    )

    work = [(a, f"key-{k}") for k in range(KEYS_PER_ASSIGNMENT) for a in assignments]
    ledger = Ledger()
    stop = threading.Event()

    def client(share: list[tuple[str, str]]) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.AllocatorStub(channel)
            for assignment_id, key in share:
                if stop.is_set():
                    return
                with ledger.lock:
                    ledger.sent.add((assignment_id, key))
                try:
                    reply = stub.RecordConversion(
                        pb.RecordConversionRequest(
                            assignment_id=assignment_id, idempotency_key=key, value=1.0
                        ),
                        timeout=RPC_TIMEOUT_S,
                    )
                except grpc.RpcError as exc:
                    with ledger.lock:
                        ledger.errors[exc.code().name] += 1
                    continue
                with ledger.lock:
                    ledger.acked.add((assignment_id, key))
                    if not reply.counted:
                        ledger.errors["counted=false on a first send"] += 1

    threads = [
        threading.Thread(target=client, args=(work[t::CLIENT_THREADS],), daemon=True)
        for t in range(CLIENT_THREADS)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(ledger.acked) < ACKS_BEFORE_KILL:
        assert time.monotonic() < deadline, f"only {len(ledger.acked)} acks in 60 s"
        assert server.alive()
        time.sleep(0.005)
    with ledger.lock:
        ledger.acked_at_kill = len(ledger.acked)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=STOP_TIMEOUT_S)
    stop.set()
    for thread in threads:
        thread.join(timeout=RPC_TIMEOUT_S + 5)
        assert not thread.is_alive()
    assert not ledger.errors.keys() - {"UNAVAILABLE"}, ledger.errors
    # Every OK the clients saw (also the ones read just after the kill) is stored exactly once.
    stored_rows = query(fresh_db, "SELECT assignment_id, idempotency_key FROM conversions")
    stored = {(r[0], r[1]) for r in stored_rows}
    assert len(stored) == len(stored_rows)
    assert ledger.acked <= stored
    assert stored <= ledger.sent
    in_flight = ledger.sent - ledger.acked
    print(
        f"sent {len(ledger.sent)}, acked {len(ledger.acked)} ({ledger.acked_at_kill} at the kill),"
        f" stored {len(stored)}, errors {dict(ledger.errors)}"
    )
    assert len(stored - ledger.acked) <= len(in_flight)
    assert assert_conversion_counters_match_rows(fresh_db, "crash") == len(stored)
    assert sum(c[0] for c in global_counts(counters(fresh_db), "crash").values()) == CRASH_USERS

    # Clients retry everything they sent: what was stored is not counted again.
    restarted = launcher.start("--postgres-dsn", fresh_db, "--seed", "22")
    sent = sorted(ledger.sent)
    for start in range(0, len(sent), 500):
        chunk = sent[start : start + 500]
        reply = restarted.allocator.RecordConversionBatch(
            pb.RecordConversionBatchRequest(
                requests=[
                    pb.RecordConversionRequest(assignment_id=a, idempotency_key=k, value=1.0)
                    for a, k in chunk
                ]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        for item, result in zip(chunk, reply.results, strict=True):
            assert result.HasField("conversion"), result.error
            assert result.conversion.counted == (item not in stored), item
    assert assert_conversion_counters_match_rows(fresh_db, "crash") == len(ledger.sent)
    assert restarted.stop() == 0
    assert sum(c[0] for c in global_counts(counters(fresh_db), "crash").values()) == CRASH_USERS
