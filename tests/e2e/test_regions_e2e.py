"""Two regions, each with its own PostgreSQL database and Redis namespace: personal data stays
in the user's region, aggregate counts sync between regions without double-counting."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import grpc
import pytest
import redis
from e2e_support import fetch, launch_process, stop_process, wait_for

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e
RPC_TIMEOUT_S = 10.0
SYNC_S = 0.5


def own_and_global(
    dsn: str,
) -> tuple[dict[tuple[str, int, int], int], dict[tuple[str, int, int], int]]:
    own = asyncio.run(
        fetch(
            dsn,
            "SELECT e.key, s.segment_hash, s.variant, s.allocations FROM segment_variant_state s"
            " JOIN experiments e ON e.id = s.experiment_id",
        )
    )
    glob = asyncio.run(
        fetch(
            dsn,
            "SELECT experiment_key, segment_hash, variant, allocations FROM v_global_segment_state",
        )
    )
    return ({(r[0], r[1], r[2]): r[3] for r in own}, {(r[0], r[1], r[2]): r[3] for r in glob})


Counts = dict[tuple[str, int, int], int]


def converged(us_dsn: str, eu_dsn: str) -> tuple[Counts, Counts, Counts, Counts, Counts]:
    """Own and global counts of both regions, once a sync has run after the last write
    (bounded wait: a loaded machine may delay the write-behind and the sync)."""
    deadline = time.monotonic() + 20
    while True:
        us_own, us_global = own_and_global(us_dsn)
        eu_own, eu_global = own_and_global(eu_dsn)
        summed = {k: us_own.get(k, 0) + eu_own.get(k, 0) for k in us_own.keys() | eu_own.keys()}
        if (us_global == summed == eu_global) or time.monotonic() > deadline:
            return us_own, eu_own, us_global, eu_global, summed
        time.sleep(SYNC_S)


def test_routing_and_sync(
    tmp_path: Path, migrated_db: str, second_db: str, fresh_redis: str
) -> None:
    us_dsn, eu_dsn = migrated_db, second_db
    config = tmp_path / "regions.json"
    config.write_text(
        json.dumps(
            {
                "seed": 5,
                "regions": {
                    "default_region": "us-east",
                    "sync_interval": SYNC_S,
                    "regions": [
                        {"code": "us-east", "countries": ["US", "CA"], "postgres_dsn": us_dsn,
                         "redis_url": fresh_redis},
                        {"code": "eu-west", "countries": ["DE", "FR"], "postgres_dsn": eu_dsn,
                         "redis_url": fresh_redis, "gdpr": True, "failover_region": "us-east"},
                    ],
                },
            }
        )
    )  # fmt: skip
    proc, channel, log = launch_process(tmp_path, "--config", str(config))
    try:
        allocator, admin = pb_grpc.AllocatorStub(channel), pb_grpc.AdminStub(channel)
        listed = admin.ListRegions(pb.ListRegionsRequest(), timeout=RPC_TIMEOUT_S)
        assert [r.code for r in listed.regions] == ["eu-west", "us-east"]
        assert listed.default_region == "us-east" and all(r.serving for r in listed.regions)
        admin.CreateExperiment(
            pb.CreateExperimentRequest(
                experiment=pb.Experiment(
                    id="geo",
                    name="geo",
                    status=pb.EXPERIMENT_STATUS_RUNNING,
                    variants=[pb.Variant(id=v, name=v) for v in ("A", "B")],
                )
            ),
            timeout=RPC_TIMEOUT_S,
        )
        deadline = time.monotonic() + 10
        while True:  # the experiment reaches eu-west within a copy interval
            try:
                allocator.Allocate(
                    pb.AllocateRequest(
                        experiment_id="geo", user_id="probe", context={"country_code": "FR"}
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline
                time.sleep(0.1)
        regions = {}
        for i in range(30):
            for country in ("DE", "US"):
                r = allocator.Allocate(
                    pb.AllocateRequest(
                        experiment_id="geo",
                        user_id=f"{country}-{i}",
                        context={"country_code": country},
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
                regions[country] = r.region
                if i % 3 == 0:
                    c = allocator.RecordConversion(
                        pb.RecordConversionRequest(assignment_id=r.assignment_id),
                        timeout=RPC_TIMEOUT_S,
                    )
                    assert c.region == r.region
        assert regions == {"DE": "eu-west", "US": "us-east"}
        time.sleep(1.0 + 3 * SYNC_S)

        def users(dsn: str) -> set[str]:
            rows = asyncio.run(
                fetch(dsn, "SELECT user_id FROM assignments UNION SELECT user_id FROM conversions")
            )
            return {r[0] for r in rows}

        # Each region's write-behind may take longer than the sleep on a loaded machine.
        wait_for(
            "every user written in its region",
            lambda: (
                {f"US-{i}" for i in range(30)} <= users(us_dsn)
                and {f"DE-{i}" for i in range(30)} <= users(eu_dsn)
            ),
            20,
        )
        us_users, eu_users = users(us_dsn), users(eu_dsn)
        assert {u for u in us_users if u.startswith("US-")} == {f"US-{i}" for i in range(30)}
        assert {u for u in eu_users if u.startswith("DE-")} == {f"DE-{i}" for i in range(30)}
        assert not any(u.startswith("DE-") for u in us_users)
        assert not any(u.startswith("US-") for u in eu_users)
        # Redis: each region's keys under its own namespace, no user in the other's.
        client = redis.Redis.from_url(fresh_redis)
        try:

            def held(prefix: str) -> str:
                out = []
                for key in client.scan_iter(match=f"{prefix}:*"):
                    kind = client.type(key)
                    body = client.hgetall(key) if kind == b"hash" else client.get(key)
                    out.append(repr(key) + repr(body))
                return "".join(out)

            us_redis, eu_redis = held("allocsvc-us-east"), held("allocsvc-eu-west")
        finally:
            client.close()
        assert "US-1" in us_redis and "DE-1" in eu_redis
        assert "DE-" not in us_redis and "US-" not in eu_redis

        # Sync: after a few intervals each region's global counts equal the sum of both.
        us_own, eu_own, us_global, eu_global, summed = converged(us_dsn, eu_dsn)
        assert sum(us_own.values()) > 0 and sum(eu_own.values()) > 0
        assert us_global == summed
        assert eu_global == summed
    finally:
        code = stop_process(proc, channel)
    assert code == 0, log.read_text()

    # Killed mid-sync, then restarted: the reruns never double-count.
    proc, channel, log = launch_process(tmp_path, "--config", str(config))
    time.sleep(SYNC_S * 1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    channel.close()
    proc, channel, log = launch_process(tmp_path, "--config", str(config))
    time.sleep(4 * SYNC_S)
    try:
        _, _, us_global2, eu_global2, summed2 = converged(us_dsn, eu_dsn)
        assert us_global2 == summed2 == eu_global2
        assert summed2 == summed
    finally:
        code = stop_process(proc, channel)
    assert code == 0, log.read_text()
