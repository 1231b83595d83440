"""Clustering and embeddings trained in the background by the real server, over gRPC.

Four kinds of simulated users (their kind known to the test) are allocated in an `auto`
experiment; TrainClusters must find the four kinds and `auto` segmentation must then put each
new user in their kind's `cluster:N` segment; TrainEmbeddings must make a user's most similar
users users of the same kind. The CLI follows a job with a progress bar.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest

from allocsvc._proto import allocsvc_pb2 as pb

if TYPE_CHECKING:
    from conftest import ServerProcess, StartServer

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 240.0
MONDAY_MS = 1_704_067_200_000  # 2024-01-01 00:00 UTC
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def request(
    experiment_id: str, user_id: str, kind: int, rng: np.random.Generator
) -> pb.AllocateRequest:
    """One request of a user of the given kind."""
    if kind == 0:  # web, phones, instagram, evenings, many pages
        channel, context = "web", {"device": "mobile", "utm_source": "instagram"}
        signals = {"pages_viewed": rng.normal(12, 1.5), "time_seconds": rng.normal(400, 40)}
        day, hour = rng.integers(0, 7), rng.integers(19, 23)
    elif kind == 1:  # email, desktops, mornings, engaged
        channel, context = "email", {"device": "desktop", "list_id": "news"}
        signals = {"engagement_score": rng.normal(0.8, 0.05)}
        day, hour = rng.integers(0, 5), rng.integers(7, 10)
    elif kind == 2:  # checkout funnel, tablets, at risk
        channel, context = "funnel", {"device": "tablet", "funnel_id": "checkout"}
        signals = {"drop_risk": rng.normal(0.7, 0.05)}
        day, hour = rng.integers(0, 7), rng.integers(12, 15)
    else:  # push, phones, weekends
        channel, context = "push", {"device": "mobile", "campaign_id": "sale"}
        signals = {"engagement_score": rng.normal(0.3, 0.05)}
        day, hour = rng.integers(5, 7), rng.integers(10, 13)
    return pb.AllocateRequest(
        experiment_id=experiment_id,
        user_id=user_id,
        channel=channel,
        context=context,
        signals={k: float(v) for k, v in signals.items()},
        timestamp_unix_ms=MONDAY_MS + int(day) * DAY_MS + int(hour) * HOUR_MS,
    )


def allocate(
    server: ServerProcess, experiment_id: str, users: list[tuple[str, int]], seed: int
) -> list[pb.AllocateResponse]:
    rng = np.random.default_rng(seed)
    replies = []
    for start in range(0, len(users), 200):
        chunk = users[start : start + 200]
        reply = server.allocator.AllocateBatch(
            pb.AllocateBatchRequest(
                requests=[request(experiment_id, u, kind, rng) for u, kind in chunk]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        for result in reply.results:
            assert result.WhichOneof("outcome") == "allocation", result
            replies.append(result.allocation)
    return replies


def wait(server: ServerProcess, job: pb.LearningJob) -> pb.ClusteringStatus:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        status = server.admin.GetClusteringStatus(
            pb.GetClusteringStatusRequest(job_id=job.job_id), timeout=RPC_TIMEOUT_S
        )
        assert status.job.job_id == job.job_id
        if status.job.state != "running":
            return status
        assert time.monotonic() < deadline, f"job still running: {status.job}"
        time.sleep(0.25)


def code_of(call: object, *args: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=RPC_TIMEOUT_S)  # type: ignore[operator]
    return caught.value.code()


def test_clusters_and_embeddings_trained_in_the_background(
    start_server: StartServer, tmp_path: Path
) -> None:
    config = tmp_path / "learning.json"
    # Every allocation feeds learning (the default samples one in ten), so the counts are exact.
    config.write_text(json.dumps({"clustering": {"observe_every": 1}}))
    server = start_server(seed=7, extra_args=("--config", str(config)))
    admin = server.admin
    # Nothing observed yet: nothing to train on, nothing to search.
    assert code_of(admin.TrainClusters, pb.TrainClustersRequest()) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert code_of(admin.FindSimilarUsers, pb.FindSimilarUsersRequest(user_id="u")) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    first = admin.GetClusteringStatus(pb.GetClusteringStatusRequest(), timeout=RPC_TIMEOUT_S)
    assert first.state == "none" and first.drift_threshold == pytest.approx(0.2)

    server.create_experiment(
        server.experiment(
            "auto-exp", segmentation=pb.SegmentationConfig(mode=pb.SEGMENTATION_MODE_AUTO)
        )
    )
    training_users = [(f"train-{i}", i % 4) for i in range(800)]
    before = allocate(server, "auto-exp", training_users, seed=1)
    assert {r.segment_key for r in before} == {"cluster:none"}

    job = admin.TrainClusters(pb.TrainClustersRequest(), timeout=RPC_TIMEOUT_S)
    assert job.kind == "clusters" and job.state == "running" and job.reason == "requested"
    status = wait(server, job)
    assert status.job.state == "succeeded", status.job.message
    assert status.state == "deployed"
    assert status.version == 1 == status.job.version
    assert status.k == 4
    assert status.samples == 800
    assert [c.k for c in status.candidates] == list(range(2, 9))
    assert status.silhouette > 0.25
    assert sorted(status.cluster_sizes) == [200, 200, 200, 200]
    assert 15 <= len(status.feature_names) <= 20
    assert not status.stale and status.age_days < 1

    # New users: each kind lands in one cluster, and the four kinds in four clusters.
    fresh_users = [(f"new-{i}", i % 4) for i in range(200)]
    after = allocate(server, "auto-exp", fresh_users, seed=2)
    by_kind: dict[int, set[str]] = {}
    for (_, kind), reply in zip(fresh_users, after, strict=True):
        by_kind.setdefault(kind, set()).add(reply.segment_key)
    assert all(len(keys) == 1 for keys in by_kind.values()), by_kind
    keys = {next(iter(k)) for k in by_kind.values()}
    assert len(keys) == 4 and all(k.startswith("cluster:") for k in keys)

    # Embeddings: a user's nearest users are of the same kind.
    job = admin.TrainEmbeddings(pb.TrainEmbeddingsRequest(epochs=10), timeout=RPC_TIMEOUT_S)
    assert job.kind == "embeddings"
    status = wait(server, job)
    assert status.job.state == "succeeded", status.job.message
    kind_of = dict(training_users + fresh_users)
    for user, kind in (("train-0", 0), ("train-1", 1), ("train-2", 2), ("train-3", 3)):
        reply = admin.FindSimilarUsers(
            pb.FindSimilarUsersRequest(user_id=user, k=10), timeout=RPC_TIMEOUT_S
        )
        assert reply.model_version == 1
        assert len(reply.users) == 10
        assert user not in {u.user_id for u in reply.users}
        assert all(kind_of[u.user_id] == kind for u in reply.users), reply
        scores = [u.similarity for u in reply.users]
        assert scores == sorted(scores, reverse=True)
    assert code_of(admin.FindSimilarUsers, pb.FindSimilarUsersRequest(user_id="nobody", k=3)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(
        admin.FindSimilarUsers, pb.FindSimilarUsersRequest(user_id="train-0", k=5000)
    ) == (grpc.StatusCode.INVALID_ARGUMENT)
    assert code_of(admin.TrainEmbeddings, pb.TrainEmbeddingsRequest(loss="hinge")) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(
        admin.GetClusteringStatus, pb.GetClusteringStatusRequest(job_id="no-such-job")
    ) == (grpc.StatusCode.NOT_FOUND)

    # The CLI starts a job and follows it to the end with a progress bar.
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "allocsvc",
            "train",
            "clusters",
            "--json",
            "--target",
            server.target,
        ],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    finished = json.loads(cli.stdout)
    assert finished["state"] == "succeeded" and finished["version"] == 2
    assert "clustering (k tried)" in cli.stderr
    assert server.alive()
