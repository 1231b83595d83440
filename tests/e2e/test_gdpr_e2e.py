"""Data protection against the real server on a real PostgreSQL and Redis: export holds every
row that existed, erasure leaves no trace of the user id (nor its hash) in any table or Redis
key, the user's next allocation is new, and both actions are audited with who asked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis
from e2e_support import launch_process, query, stop_process, wait_for

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc
from allocsvc.core import key_hash

pytestmark = pytest.mark.e2e
RPC_TIMEOUT_S = 10.0
USER = "gdpr-user-0042"
OTHER = "gdpr-user-0043"


def traces(user_id: str) -> list[str]:
    """The forms the user id or its 64-bit hash could take when stored."""
    h = key_hash(user_id)
    signed = h - (1 << 64) if h >= 1 << 63 else h
    return [user_id, str(h), str(signed), f"{h:x}", f"{h:016x}"]


async def scan_postgres(dsn: str, needles: list[str]) -> list[str]:
    """Every base table and materialized view, every row as text: where a needle occurs."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("REFRESH MATERIALIZED VIEW mv_segment_analytics")
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            " UNION ALL SELECT matviewname FROM pg_matviews WHERE schemaname = current_schema()"
        )
        assert {"assignments", "conversions", "audit_log"} <= {t[0] for t in tables}
        found = []
        for (table,) in tables:
            ident = '"' + table.replace('"', '""') + '"'
            for (text,) in await conn.fetch("SELECT t::text FROM " + ident + " t"):
                found += [f"{table}: {text}" for n in needles if n in text]
        return found
    finally:
        await conn.close()


def scan_redis(url: str, needles: list[str]) -> list[str]:
    client = redis.Redis.from_url(url)
    found = []
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "hash":
                body = repr(client.hgetall(key))
            elif kind == "string":
                body = repr(client.get(key))
            elif kind == "set":
                body = repr(client.smembers(key))
            elif kind == "list":
                body = repr(client.lrange(key, 0, -1))
            else:
                body = ""
            text = repr(key) + body
            found += [f"{key!r}: {text[:200]}" for n in needles if n in text]
    finally:
        client.close()
    return found


@pytest.fixture
def served(
    tmp_path: Path, migrated_db: str, fresh_redis: str
) -> Iterator[tuple[pb_grpc.AllocatorStub, pb_grpc.AdminStub, str, str]]:
    proc, channel, log = launch_process(
        tmp_path, "--seed", "3", "--postgres-dsn", migrated_db, "--redis-url", fresh_redis
    )
    yield pb_grpc.AllocatorStub(channel), pb_grpc.AdminStub(channel), migrated_db, fresh_redis
    assert stop_process(proc, channel) == 0, log.read_text()


def test_export_then_erase_leaves_no_trace(
    served: tuple[pb_grpc.AllocatorStub, pb_grpc.AdminStub, str, str],
) -> None:
    allocator, admin, dsn, redis_url = served
    for key in ("gdpr-a", "gdpr-b"):
        admin.CreateExperiment(
            pb.CreateExperimentRequest(
                experiment=pb.Experiment(
                    id=key,
                    name=key,
                    status=pb.EXPERIMENT_STATUS_RUNNING,
                    variants=[pb.Variant(id=v, name=v) for v in ("A", "B")],
                )
            ),
            timeout=RPC_TIMEOUT_S,
        )
    first = {}
    for key in ("gdpr-a", "gdpr-b"):
        for user in (USER, OTHER):
            r = allocator.Allocate(
                pb.AllocateRequest(experiment_id=key, user_id=user), timeout=RPC_TIMEOUT_S
            )
            first[(key, user)] = r.assignment_id
    conv = allocator.RecordConversion(
        pb.RecordConversionRequest(assignment_id=first[("gdpr-a", USER)], value=2.5),
        timeout=RPC_TIMEOUT_S,
    )
    assert conv.counted and conv.region == "local"
    allocator.RecordConversion(
        pb.RecordConversionRequest(assignment_id=first[("gdpr-a", OTHER)]), timeout=RPC_TIMEOUT_S
    )
    # The write-behind puts the four assignments in PostgreSQL, with their allocation counts
    # in the same flush: waited for, as a fixed sleep may end first on a loaded machine.
    stored = "SELECT count(*) FROM assignments WHERE user_id = ANY($1::text[])"
    wait_for(
        "the write-behind of the assignments",
        lambda: query(dsn, stored, [USER, OTHER])[0][0] == 4,
        timeout=30,
    )

    async def rows_before() -> tuple[list[str], list[int], int]:
        conn = await asyncpg.connect(dsn)
        try:
            ids = [
                r[0] for r in await conn.fetch("SELECT id FROM assignments WHERE user_id=$1", USER)
            ]
            convs = [
                r[0] for r in await conn.fetch("SELECT id FROM conversions WHERE user_id=$1", USER)
            ]
            allocs = await conn.fetchval("SELECT sum(allocations) FROM segment_variant_state")
            return ids, convs, int(allocs)
        finally:
            await conn.close()

    assignment_ids, conversion_ids, allocations_before = asyncio.run(rows_before())
    assert sorted(assignment_ids) == sorted([first[("gdpr-a", USER)], first[("gdpr-b", USER)]])
    assert len(conversion_ids) == 1

    exported = admin.ExportUserData(pb.ExportUserDataRequest(user_id=USER), timeout=RPC_TIMEOUT_S)
    data = json.loads(exported.json)
    assert exported.regions == ["local"]
    sources = data[0]["sources"]
    assert sorted(r["id"] for r in sources["postgres"]["assignments"]) == sorted(assignment_ids)
    assert [r["id"] for r in sources["postgres"]["conversions"]] == conversion_ids
    assert sorted(r["id"] for r in sources["memory"]["assignments"]) == sorted(assignment_ids)
    redis_assignments = {k["assignment"]["id"] for k in sources["redis"]["keys"]}
    assert redis_assignments == set(assignment_ids)
    assert OTHER not in exported.json

    needles = traces(USER)
    assert scan_redis(redis_url, needles), "the user should be in Redis before erasure"
    assert asyncio.run(scan_postgres(dsn, needles)), "the user should be in Postgres before"

    erased = admin.DeleteUserData(
        pb.DeleteUserDataRequest(user_id=USER, reason="ticket 17"), timeout=RPC_TIMEOUT_S
    )
    assert erased.receipt_id and erased.regions == ["local"]
    assert erased.removed["local/postgres.assignments"] == 2
    assert erased.removed["local/postgres.conversions"] == 1
    assert USER not in erased.receipt_id

    assert scan_redis(redis_url, needles) == []
    assert asyncio.run(scan_postgres(dsn, needles)) == []

    async def after() -> tuple[int, int, list[asyncpg.Record]]:
        conn = await asyncpg.connect(dsn)
        try:
            others = await conn.fetchval("SELECT count(*) FROM assignments WHERE user_id=$1", OTHER)
            allocs = await conn.fetchval("SELECT sum(allocations) FROM segment_variant_state")
            audit = await conn.fetch(
                "SELECT actor, action, target, details FROM audit_log ORDER BY id"
            )
            return int(others), int(allocs), list(audit)
        finally:
            await conn.close()

    others, allocations_after, audit = asyncio.run(after())
    assert others == 2, "another user's rows must stay"
    assert allocations_after == allocations_before, "aggregate counts stay"
    actions = [(r["actor"], r["action"], r["target"]) for r in audit]
    assert ("anonymous", "user.erase", f"erasure:{erased.receipt_id}") in actions
    # The export's audit entry was renamed to the receipt, not deleted.
    assert ("anonymous", "user.export", f"erasure:{erased.receipt_id}") in actions

    # The next allocation treats the user as new; the other user stays sticky.
    again = allocator.Allocate(
        pb.AllocateRequest(experiment_id="gdpr-a", user_id=USER), timeout=RPC_TIMEOUT_S
    )
    assert not again.sticky and again.assignment_id != first[("gdpr-a", USER)]
    still = allocator.Allocate(
        pb.AllocateRequest(experiment_id="gdpr-a", user_id=OTHER), timeout=RPC_TIMEOUT_S
    )
    assert still.sticky and still.assignment_id == first[("gdpr-a", OTHER)]
    # The old assignment is gone for conversions too.
    with pytest.raises(grpc.RpcError) as err:
        allocator.RecordConversion(
            pb.RecordConversionRequest(assignment_id=first[("gdpr-b", USER)]),
            timeout=RPC_TIMEOUT_S,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_requests_name_the_field(
    served: tuple[pb_grpc.AllocatorStub, pb_grpc.AdminStub, str, str],
) -> None:
    _, admin, _, _ = served
    with pytest.raises(grpc.RpcError) as err:
        admin.DeleteUserData(pb.DeleteUserDataRequest(user_id=""), timeout=RPC_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        admin.ExportUserData(
            pb.ExportUserDataRequest(user_id="u", region="nowhere"), timeout=RPC_TIMEOUT_S
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
