"""Two regions: AllocateBatch and RecordConversionBatch route each item to its user's region
(data residency), and after a sync interval a region's decisions use global counts: traffic
recorded only in us-east changes eu-west's allocations, without entering eu-west's own
counts (so nothing is double-counted)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_support import fetch, launch_process, stop_process, wait_for

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc
from allocsvc.core import key_hash

pytestmark = pytest.mark.e2e
RPC_TIMEOUT_S = 30.0
WAIT_S = 30.0
SYNC_S = 1.0


def users_in(dsn: str, table: str) -> set[str]:
    rows = asyncio.run(fetch(dsn, f"SELECT user_id FROM {table}"))
    return {r[0] for r in rows if r[0] is not None}


def item(user: str, country: str) -> pb.AllocateRequest:
    return pb.AllocateRequest(experiment_id="glob", user_id=user, context={"country_code": country})


def test_batch_routing_and_global_posteriors(
    tmp_path: Path, migrated_db: str, second_db: str, fresh_redis: str
) -> None:
    us_dsn, eu_dsn = migrated_db, second_db
    config = tmp_path / "regions.json"
    config.write_text(
        json.dumps(
            {
                "seed": 13,
                "regions": {
                    "default_region": "us-east",
                    "sync_interval": SYNC_S,
                    "regions": [
                        {"code": "us-east", "countries": ["US"], "postgres_dsn": us_dsn,
                         "redis_url": fresh_redis},
                        {"code": "eu-west", "countries": ["DE"], "postgres_dsn": eu_dsn,
                         "redis_url": fresh_redis, "gdpr": True},
                    ],
                },
            }
        )
    )  # fmt: skip
    proc, channel, log = launch_process(tmp_path, "--config", str(config))
    try:
        allocator, admin = pb_grpc.AllocatorStub(channel), pb_grpc.AdminStub(channel)
        admin.CreateExperiment(
            pb.CreateExperimentRequest(
                experiment=pb.Experiment(
                    id="glob",
                    name="glob",
                    status=pb.EXPERIMENT_STATUS_RUNNING,
                    sticky=False,
                    variants=[pb.Variant(id=v, name=v) for v in ("A", "B")],
                )
            ),
            timeout=RPC_TIMEOUT_S,
        )

        def reaches_eu() -> bool:
            try:
                return allocator.Allocate(item("probe", "DE"), timeout=RPC_TIMEOUT_S).region == (
                    "eu-west"
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                return False

        wait_for("the experiment in eu-west", reaches_eu, WAIT_S, poll=0.2)

        def eu_share_of_b(tag: str) -> float:
            """Share of B among 200 new eu-west users (in one mixed batch with US users)."""
            batch = [item(f"DE-{tag}-{i}", "DE") for i in range(200)]
            batch[::10] = [item(f"US-{tag}-{i}", "US") for i in range(20)]
            reply = allocator.AllocateBatch(
                pb.AllocateBatchRequest(requests=batch), timeout=RPC_TIMEOUT_S
            )
            regions = [r.allocation.region for r in reply.results]
            assert regions == [
                "us-east" if r.user_id.startswith("US-") else "eu-west" for r in batch
            ]
            de = [r.allocation for r in reply.results if r.allocation.region == "eu-west"]
            return sum(a.variant_id == "B" for a in de) / len(de)

        before = eu_share_of_b("before")

        # Traffic in us-east only: B converts at 50%, A never.
        rng = np.random.default_rng(2)
        us_batch = [item(f"US-{i}", "US") for i in range(400)]
        reply = allocator.AllocateBatch(
            pb.AllocateBatchRequest(requests=us_batch), timeout=RPC_TIMEOUT_S
        )
        conversions = [
            pb.RecordConversionRequest(assignment_id=r.allocation.assignment_id)
            for r in reply.results
            if r.allocation.variant_id == "B" and rng.random() < 0.5
        ]
        assert conversions
        # One eu-west conversion in the same batch goes to eu-west.
        de = allocator.Allocate(item("DE-converter", "DE"), timeout=RPC_TIMEOUT_S)
        conversions.append(pb.RecordConversionRequest(assignment_id=de.assignment_id))
        done = allocator.RecordConversionBatch(
            pb.RecordConversionBatchRequest(requests=conversions), timeout=RPC_TIMEOUT_S
        )
        assert [r.conversion.region for r in done.results] == ["us-east"] * (
            len(conversions) - 1
        ) + ["eu-west"]
        assert all(r.conversion.counted for r in done.results)
        us_conversions = len(conversions) - 1

        def eu_knows_us() -> bool:
            rows = asyncio.run(
                fetch(
                    eu_dsn,
                    "SELECT coalesce(max(conversions), 0) FROM region_remote_counts"
                    " WHERE source_region = 'us-east' AND experiment_key = 'glob'",
                )
            )
            return int(rows[0][0]) >= us_conversions

        wait_for("us-east's counts in eu-west", eu_knows_us, WAIT_S, poll=0.2)
        time.sleep(2 * SYNC_S)  # the next sync loads them into eu-west's engine
        after = eu_share_of_b("after")
        assert 0.3 < before < 0.7, before
        assert after > 0.9, (before, after)

        # Residency: every user's rows only in their region's store.
        wait_for(
            "eu-west's assignments written",
            lambda: (
                {f"DE-after-{i}" for i in range(200) if i % 10} <= users_in(eu_dsn, "assignments")
            ),
            WAIT_S,
            poll=0.2,
        )
        us_users = users_in(us_dsn, "assignments") | users_in(us_dsn, "conversions")
        eu_users = users_in(eu_dsn, "assignments") | users_in(eu_dsn, "conversions")
        assert not any(u.startswith("DE-") for u in us_users)
        assert not any(u.startswith("US-") for u in eu_users)
        assert "DE-converter" in users_in(eu_dsn, "conversions")
        assert {f"US-{i}" for i in range(400)} <= us_users

        # eu-west's own counts hold only its own traffic: one conversion, none of us-east's.
        root = key_hash("")
        root = root - (1 << 64) if root >= 1 << 63 else root
        counted = "SELECT coalesce(sum(s.conversions), 0) FROM segment_variant_state s JOIN"
        counted += " experiments e ON e.id = s.experiment_id WHERE e.key = 'glob'"
        counted += " AND s.segment_hash = $1"
        assert int(asyncio.run(fetch(eu_dsn, counted, root))[0][0]) == 1
        assert int(asyncio.run(fetch(us_dsn, counted, root))[0][0]) == us_conversions
    finally:
        code = stop_process(proc, channel, timeout=30)
    assert code == 0, log.read_text()


def test_saved_regions_load_at_start(
    tmp_path: Path, migrated_db: str, second_db: str, fresh_redis: str
) -> None:
    us_dsn, eu_dsn = migrated_db, second_db
    config = tmp_path / "regions.json"
    config.write_text(
        json.dumps(
            {
                "regions": {
                    "regions": [
                        {"code": "us-east", "name": "Virginia", "countries": ["US"],
                         "postgres_dsn": us_dsn, "redis_url": fresh_redis},
                    ],
                },
            }
        )
    )  # fmt: skip
    proc, channel, log = launch_process(tmp_path, "--config", str(config))
    try:
        allocator, admin = pb_grpc.AllocatorStub(channel), pb_grpc.AdminStub(channel)
        admin.CreateExperiment(
            pb.CreateExperimentRequest(
                experiment=pb.Experiment(
                    id="glob",
                    name="glob",
                    status=pb.EXPERIMENT_STATUS_RUNNING,
                    variants=[pb.Variant(id=v, name=v) for v in ("A", "B")],
                )
            ),
            timeout=RPC_TIMEOUT_S,
        )
        added = admin.UpsertRegion(
            pb.UpsertRegionRequest(
                region=pb.Region(
                    code="eu-west",
                    countries=["DE"],
                    postgres_dsn=eu_dsn,
                    redis_url=fresh_redis,
                    gdpr=True,
                    failover_region="us-east",
                )
            ),
            timeout=RPC_TIMEOUT_S,
        )
        # Saved, but served only after a restart: its countries stay with the default region.
        assert not added.serving and list(added.countries) == ["DE"]
        before = allocator.Allocate(item("DE-early", "DE"), timeout=RPC_TIMEOUT_S)
        assert before.region == "us-east"
        # The config file wins over a saved change of a region it names.
        admin.UpsertRegion(
            pb.UpsertRegionRequest(
                region=pb.Region(code="us-east", name="renamed", countries=["US"])
            ),
            timeout=RPC_TIMEOUT_S,
        )
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()

    proc, channel, log = launch_process(tmp_path, "--config", str(config))
    try:
        allocator, admin = pb_grpc.AllocatorStub(channel), pb_grpc.AdminStub(channel)
        listed = admin.ListRegions(pb.ListRegionsRequest(), timeout=RPC_TIMEOUT_S)
        by_code = {r.code: r for r in listed.regions}
        assert sorted(by_code) == ["eu-west", "us-east"] and listed.default_region == "us-east"
        assert by_code["eu-west"].serving and by_code["eu-west"].gdpr
        assert by_code["eu-west"].failover_region == "us-east"
        assert by_code["us-east"].name == "Virginia"

        def reaches_eu() -> bool:
            try:
                answer = allocator.Allocate(item("DE-late", "DE"), timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                return False
            assert answer.region == "eu-west"
            return True

        wait_for("the experiment in eu-west", reaches_eu, WAIT_S, poll=0.2)
        wait_for(
            "eu-west's write",
            lambda: "DE-late" in users_in(eu_dsn, "assignments"),
            WAIT_S,
            poll=0.2,
        )
        assert "DE-late" not in users_in(us_dsn, "assignments")
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, log.read_text()
