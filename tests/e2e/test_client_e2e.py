"""allocsvc.client (sync and asyncio) against the real server process: calls, errors, retries."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from e2e_support import free_port

from allocsvc.client import (
    NO_RETRY,
    AlreadyExists,
    AsyncClient,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RetryEvent,
    RetryPolicy,
    Unavailable,
    as_dict,
    pb,
)

pytestmark = pytest.mark.e2e

EXPERIMENT = {
    "status": "running",
    "variants": [{"id": "green", "payload": {"color": "#0a0"}}, "blue"],
    "segmentation": {"mode": "manual", "segment_by": ["source"], "min_samples_per_segment": 50},
}

USERS = 3000


def test_sync_client_allocates_converts_and_manages(server) -> None:  # type: ignore[no-untyped-def]
    with Client(server.target, timeout=10, token="not-checked-yet") as client:
        created = client.create_experiment({"id": "client-sync", "name": "Sync", **EXPERIMENT})
        assert created.status == pb.EXPERIMENT_STATUS_RUNNING
        assert [v.id for v in created.variants] == ["green", "blue"]
        assert created.variants[0].payload_json == '{"color":"#0a0"}'
        with pytest.raises(AlreadyExists):
            client.create_experiment({"id": "client-sync", **EXPERIMENT})

        first = client.allocate("client-sync", "u1", context={"utm_source": "google"})
        assert first.variant_id in {"green", "blue"}
        assert first.segment_key == "source:google"
        again = client.allocate("client-sync", "u1", context={"utm_source": "google"})
        assert again.sticky and again.assignment_id == first.assignment_id

        counted = client.record_conversion(first.assignment_id, value=3.0, idempotency_key="o-1")
        repeat = client.record_conversion(first.assignment_id, value=3.0, idempotency_key="o-1")
        assert (counted.counted, repeat.counted) == (True, False)
        by_user = client.record_conversion(experiment_id="client-sync", user_id="u1")
        assert by_user.assignment_id == first.assignment_id

        results = client.allocate_batch(
            [
                {"experiment_id": "client-sync", "user_id": "u2"},
                pb.AllocateRequest(experiment_id="client-sync", user_id=""),
            ]
        )
        assert results[0].WhichOneof("outcome") == "allocation"
        assert results[1].error.field == "user_id"

        segments = client.list_segments("client-sync")
        assert {s.segment_key for s in segments} >= {"", "source:google"}
        assert "client-sync" in [e.id for e in client.list_experiments("running")]
        assert as_dict(client.get_experiment("client-sync"))["status"] == (
            "EXPERIMENT_STATUS_RUNNING"
        )

        paused = client.pause_experiment("client-sync")
        assert paused.status == pb.EXPERIMENT_STATUS_PAUSED
        with pytest.raises(FailedPrecondition) as not_running:
            client.allocate("client-sync", "u3")
        # Not a retryable status: tried once.
        assert not_running.value.attempts == 1
        assert client.resume_experiment("client-sync").status == pb.EXPERIMENT_STATUS_RUNNING
        assert client.allocate("client-sync", "u3").variant_id in {"green", "blue"}

        with pytest.raises(NotFound):
            client.allocate("no-such-experiment", "u1")
        with pytest.raises(InvalidArgument) as bad:
            client.allocate("client-sync", "")
        assert bad.value.field == "user_id"
        assert bad.value.code is grpc.StatusCode.INVALID_ARGUMENT


async def test_async_client_same_flow(server) -> None:  # type: ignore[no-untyped-def]
    async with AsyncClient(server.target, timeout=10) as client:
        await client.create_experiment({"id": "client-async", **EXPERIMENT})
        answers = [await client.allocate("client-async", f"a{i}") for i in range(20)]
        assert {a.variant_id for a in answers} <= {"green", "blue"}
        assert len({a.assignment_id for a in answers}) == 20
        again = await client.allocate("client-async", "a0")
        assert again.sticky and again.assignment_id == answers[0].assignment_id
        results = await client.record_conversion_batch(
            [{"assignment_id": a.assignment_id, "idempotency_key": "k"} for a in answers[:5]]
            + [{"assignment_id": "nope"}]
        )
        assert [r.conversion.counted for r in results[:5]] == [True] * 5
        assert results[5].error.code == grpc.StatusCode.NOT_FOUND.value[0]
        segments = await client.list_segments("client-async")
        global_counts = next(s for s in segments if s.segment_key == "")
        assert sum(v.allocations for v in global_counts.variants) == 20
        assert sum(v.conversions for v in global_counts.variants) == 5
        with pytest.raises(NotFound):
            await client.get_experiment("missing")


async def test_async_client_segmentation_config_and_eligibility(server) -> None:  # type: ignore[no-untyped-def]
    async with AsyncClient(server.target, timeout=10) as client:
        await client.create_experiment({"id": "client-seg", **EXPERIMENT})
        config = await client.get_segmentation_config("client-seg")
        assert (config.mode, list(config.segment_by)) == (pb.SEGMENTATION_MODE_MANUAL, ["source"])
        # The server fills in its contextual.min_samples_per_segment (100 by default) for 0.
        updated = await client.update_segmentation_config(
            "client-seg", {"mode": "manual", "segment_by": ["device", "source"]}
        )
        assert list(updated.segment_by) == ["device", "source"]
        assert updated.min_samples_per_segment == 100
        assert (await client.get_segmentation_config("client-seg")) == updated
        with pytest.raises(InvalidArgument) as bad:
            await client.update_segmentation_config(
                "client-seg", {"mode": "manual", "segment_by": ["shoe_size"]}
            )
        assert bad.value.field == "experiment.segmentation.segment_by[0]"
        eligibility = await client.get_eligibility("client-seg")
        assert not eligibility.eligible and eligibility.threshold == 1000
        with pytest.raises(NotFound):
            await client.accept_recommendation("no-such-recommendation")
        with pytest.raises(NotFound):
            await client.dismiss_recommendation("no-such-recommendation")


def test_sync_client_trains_clusters(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(seed=3)
    with Client(server.target, timeout=30) as client:
        # Nothing observed yet: nothing to train on, no embedding model to search.
        with pytest.raises(FailedPrecondition):
            client.train_clusters()
        with pytest.raises(FailedPrecondition):
            client.find_similar_users("u1")
        assert client.get_clustering_status().state == "none"
        client.create_experiment(
            {
                "id": "client-auto",
                "status": "running",
                "variants": ["a", "b"],
                "segmentation": {"mode": "auto"},
            }
        )

        # Two kinds of users that differ in every feature, each with some spread. The server
        # learns from a sample of allocations (clustering.observe_every): enough for 200 rows.
        def request(i: int) -> dict[str, object]:
            spread = (i // 2) % 10
            if i % 2 == 0:
                return {
                    "channel": "web",
                    "context": {"user_agent": "iPhone", "utm_source": "instagram"},
                    "signals": {"pages_viewed": 10.0 + spread, "time_seconds": 300.0 + spread},
                }
            return {
                "channel": "email",
                "context": {"list_id": "news"},
                "signals": {"engagement_score": 0.8 + spread / 100, "previous_opens": spread},
            }

        results = client.allocate_batch(
            [
                {"experiment_id": "client-auto", "user_id": f"k{i}", **request(i)}
                for i in range(USERS)
            ]
        )
        assert all(r.WhichOneof("outcome") == "allocation" for r in results)
        job = client.train_clusters()
        assert (job.kind, job.state, job.reason) == ("clusters", "running", "requested")
        deadline = time.monotonic() + 240
        status = client.get_clustering_status(job.job_id)
        while status.job.state == "running":
            assert time.monotonic() < deadline, status.job
            time.sleep(0.25)
            status = client.get_clustering_status(job.job_id)
        assert status.job.job_id == job.job_id
        assert status.job.state == "succeeded", status.job.message
        assert status.state == "deployed" and status.k >= 2 and 200 <= status.samples <= USERS


def test_retries_back_off_exponentially_and_only_where_safe() -> None:
    """A server that is not there: safe calls are retried with doubling delays, the others
    are tried once."""
    events: list[RetryEvent] = []
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=1.0, jitter=0.0)
    with Client(f"127.0.0.1:{free_port()}", timeout=30, retry=policy, on_retry=events.append) as c:
        with pytest.raises(Unavailable) as allocate:
            c.allocate("e", "u")
        assert allocate.value.attempts == 4
        assert [e.delay for e in events] == pytest.approx([0.01, 0.02, 0.04])
        assert [e.attempt for e in events] == [1, 2, 3]

        events.clear()
        with pytest.raises(Unavailable) as conversion:
            c.record_conversion("some-assignment", idempotency_key="k")
        assert conversion.value.attempts == 4 and len(events) == 3

        events.clear()
        with pytest.raises(Unavailable) as create:
            c.create_experiment({"id": "e", **EXPERIMENT})
        with pytest.raises(Unavailable) as no_retry:
            c.allocate("e", "u", retry=False)
        assert (create.value.attempts, no_retry.value.attempts, events) == (1, 1, [])

    with Client(f"127.0.0.1:{free_port()}", retry=NO_RETRY) as c, pytest.raises(Unavailable):
        c.list_experiments()

    # A deadline shorter than the backoff schedule stops retrying early.
    slow = RetryPolicy(max_attempts=50, initial_backoff=0.2, max_backoff=5.0, jitter=0.0)
    with Client(f"127.0.0.1:{free_port()}", timeout=0.5, retry=slow) as c:
        with pytest.raises(Unavailable) as cut:
            c.list_experiments()
        assert cut.value.attempts < 50


def test_retry_reaches_a_server_that_comes_up(start_server) -> None:  # type: ignore[no-untyped-def]
    """The first attempt finds nothing listening; the server starts; a retry succeeds."""
    port = free_port()
    started = []

    def start_on_first_retry(event: RetryEvent) -> None:
        if not started:
            started.append(start_server(extra_args=("--port", str(port))))

    policy = RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.5)
    with Client(f"127.0.0.1:{port}", timeout=60, retry=policy, on_retry=start_on_first_retry) as c:
        assert c.list_experiments() == []
        assert started and started[0].port == port
        created = c.create_experiment({"id": "late", **EXPERIMENT})
        assert created.id == "late"


def test_client_is_shared_between_threads(server) -> None:  # type: ignore[no-untyped-def]
    with Client(server.target, timeout=10) as client:
        client.create_experiment({"id": "client-threads", **EXPERIMENT})
        found: list[str] = []
        lock = threading.Lock()

        def work(n: int) -> None:
            for i in range(25):
                a = client.allocate("client-threads", f"t{n}-{i}")
                with lock:
                    found.append(a.assignment_id)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(found)) == 100
        segments = client.list_segments("client-threads")
        assert (
            sum(v.allocations for s in segments if s.segment_key == "" for v in s.variants) == 100
        )
