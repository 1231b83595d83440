"""An erasure reaches the other replica's memory: two server processes on one PostgreSQL and one
Redis, the user known to both, DeleteUserData sent to one. The other drops the user within a
bounded wait (its next Allocate is new), and once both have flushed and stopped no table or Redis
key holds the erased assignments, nor the user outside the one assignment made after the
erasure. The erasure log names the user only by a keyed hash."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import pytest
from e2e_support import Launcher, Server, query, wait_for
from test_gdpr_e2e import scan_postgres, scan_redis, traces

from allocsvc._proto import allocsvc_pb2 as pb

pytestmark = pytest.mark.e2e
RPC_TIMEOUT_S = 10.0
# Far above the 1 s poll interval: the bound a replica keeps an erased user in memory.
PROPAGATION_S = 15.0
USER = "erase-me-0815"
OTHER = "keep-me-0816"


def allocate(server: Server, experiment: str, user: str) -> pb.AllocateResponse:
    return server.allocator.Allocate(
        pb.AllocateRequest(experiment_id=experiment, user_id=user), timeout=RPC_TIMEOUT_S
    )


def rows_of(dsn: str, user: str) -> int:
    return int(query(dsn, "SELECT count(*) FROM assignments WHERE user_id = $1", user)[0][0])


def test_erasure_on_one_replica_reaches_the_other(
    launcher: Launcher, migrated_db: str, fresh_redis: str
) -> None:
    a, b = launcher.start_together(
        2, "--seed", "5", "--postgres-dsn", migrated_db, "--redis-url", fresh_redis
    )
    a.create_experiment(Server.experiment("erase-sticky"))
    a.create_experiment(Server.experiment("erase-plain", sticky=False))
    for key in ("erase-sticky", "erase-plain"):
        wait_for(f"replica B sees {key!r}", lambda k=key: b.knows(k), timeout=PROPAGATION_S)

    # Both users sticky on both replicas: B holds A's assignments in its memory.
    first = {u: allocate(a, "erase-sticky", u) for u in (USER, OTHER)}
    for user, earlier in first.items():
        again = allocate(b, "erase-sticky", user)
        assert again.sticky and again.assignment_id == earlier.assignment_id
    # B's own assignment of the user, converted on B.
    plain = allocate(b, "erase-plain", USER)
    b.allocator.RecordConversion(
        pb.RecordConversionRequest(assignment_id=plain.assignment_id, value=1.0),
        timeout=RPC_TIMEOUT_S,
    )
    wait_for("assignments written", lambda: rows_of(migrated_db, USER) == 2, PROPAGATION_S)
    erased_ids = [first[USER].assignment_id, plain.assignment_id]

    reply = a.admin.DeleteUserData(
        pb.DeleteUserDataRequest(user_id=USER, reason="ticket 8c"), timeout=RPC_TIMEOUT_S
    )
    assert reply.removed["local/postgres.assignments"] == 2

    # B applies the erasure on its next poll; its next Allocate of the user is then new.
    wait_for("B applied the erasure", lambda: "erasure applied" in b.stderr(), PROPAGATION_S)
    assert "erasure applied" not in a.stderr(), "A erased already: its own entry is skipped"
    fresh = allocate(b, "erase-sticky", USER)
    assert not fresh.sticky and fresh.assignment_id not in erased_ids
    # The same on A, which sees B's new assignment through Redis; the other user stays.
    assert allocate(a, "erase-sticky", USER).assignment_id == fresh.assignment_id
    kept = allocate(b, "erase-sticky", OTHER)
    assert kept.sticky and kept.assignment_id == first[OTHER].assignment_id

    launcher.stop(a)
    launcher.stop(b)

    # Nothing left of the erased assignments; the user only in the one made after the erasure.
    postgres = asyncio.run(scan_postgres(migrated_db, [*erased_ids, *traces(USER)]))
    redis_found = scan_redis(fresh_redis, [*erased_ids, *traces(USER)])
    stray = [hit for hit in postgres + redis_found if fresh.assignment_id not in hit]
    assert stray == [], stray
    assert any(fresh.assignment_id in hit for hit in postgres)
    for erased in erased_ids:
        assert not any(erased in hit for hit in postgres + redis_found)
    assert rows_of(migrated_db, OTHER) == 1

    # The log names the user by HMAC-SHA256 under the deployment's key, not by id or bare hash.
    key = bytes(query(migrated_db, "SELECT key FROM erasure_key")[0][0])
    hashes = [bytes(r[0]) for r in query(migrated_db, "SELECT user_hash FROM erasure_log")]
    assert hashes == [hmac.digest(key, USER.encode(), "sha256")]
    bare = {hashlib.new(n, USER.encode()).digest() for n in ("sha256", "sha1", "md5", "blake2b")}
    assert not bare & set(hashes) and USER.encode() not in hashes[0]
