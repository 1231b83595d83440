"""Learned models reach every replica and survive a restart (two server processes, one
PostgreSQL); clustering can run on embeddings; training jobs show in Prometheus metrics.

Replica `one` sees the traffic (four kinds of simulated users, their kind known to the test)
and trains; replica `two` never trains, yet within its model poll interval it serves the same
clusters and answers FindSimilarUsers the same way. After `one` restarts, the embedding model
and the users' embeddings come back from PostgreSQL.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from e2e_support import Launcher, Server, free_port

from allocsvc._proto import allocsvc_pb2 as pb

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 240.0
POLL_S = 0.5
# Every allocation feeds the sample (the default keeps one in ten); replicas look for new
# models every POLL_S.
ENVIRONMENT = {
    "ALLOCSVC_CLUSTERING__OBSERVE_EVERY": "1",
    "ALLOCSVC_CLUSTERING__MODEL_POLL_INTERVAL": str(POLL_S),
    "ALLOCSVC_EMBEDDINGS__ENABLED": "true",
}
MONDAY_MS = 1_704_067_200_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Starts `allocsvc serve <args>` with ENVIRONMENT; kills what still runs at the end."""
    started = Launcher(tmp_path, env=ENVIRONMENT)
    yield started.start
    started.close()


def request(experiment_id: str, user_id: str, kind: int, rng: np.random.Generator) -> Any:
    """One request of a user of the given kind (the four kinds differ in every feature)."""
    if kind == 0:
        channel, context = "web", {"device": "mobile", "utm_source": "instagram"}
        signals = {"pages_viewed": rng.normal(12, 1.5), "time_seconds": rng.normal(400, 40)}
        day, hour = rng.integers(0, 7), rng.integers(19, 23)
    elif kind == 1:
        channel, context = "email", {"device": "desktop", "list_id": "news"}
        signals = {"engagement_score": rng.normal(0.8, 0.05)}
        day, hour = rng.integers(0, 5), rng.integers(7, 10)
    elif kind == 2:
        channel, context = "funnel", {"device": "tablet", "funnel_id": "checkout"}
        signals = {"drop_risk": rng.normal(0.7, 0.05)}
        day, hour = rng.integers(0, 7), rng.integers(12, 15)
    else:
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


def segments(server: Server, experiment_id: str, users: list[tuple[str, int]], seed: int) -> Any:
    """Segment key of each user's allocation (same seed: same contexts)."""
    rng = np.random.default_rng(seed)
    keys = []
    for start in range(0, len(users), 200):
        reply = server.allocator.AllocateBatch(
            pb.AllocateBatchRequest(
                requests=[request(experiment_id, u, k, rng) for u, k in users[start : start + 200]]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        for result in reply.results:
            assert result.WhichOneof("outcome") == "allocation", result
            keys.append(result.allocation.segment_key)
    return keys


def auto_experiment(server: Server, key: str) -> None:
    server.admin.CreateExperiment(
        pb.CreateExperimentRequest(
            experiment=pb.Experiment(
                id=key,
                name=key,
                status=pb.EXPERIMENT_STATUS_RUNNING,
                variants=[pb.Variant(id="A", name="A"), pb.Variant(id="B", name="B")],
                segmentation=pb.SegmentationConfig(mode=pb.SEGMENTATION_MODE_AUTO),
            )
        ),
        timeout=RPC_TIMEOUT_S,
    )


def finish(server: Server, job: Any) -> Any:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        status = server.admin.GetClusteringStatus(
            pb.GetClusteringStatusRequest(job_id=job.job_id), timeout=RPC_TIMEOUT_S
        )
        if status.job.state != "running":
            assert status.job.state == "succeeded", status.job.message
            return status
        assert time.monotonic() < deadline, f"job still running: {status.job}"
        time.sleep(0.25)


def eventually(what: str, check: Callable[[], Any], timeout: float = 10 * POLL_S + 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except grpc.RpcError:
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def status_of(server: Server) -> Any:
    return server.admin.GetClusteringStatus(pb.GetClusteringStatusRequest(), timeout=RPC_TIMEOUT_S)


def similar(server: Server, user: str) -> list[tuple[str, float]]:
    reply = server.admin.FindSimilarUsers(
        pb.FindSimilarUsersRequest(user_id=user, k=10), timeout=RPC_TIMEOUT_S
    )
    assert reply.model_version == 1
    return [(u.user_id, round(u.similarity, 4)) for u in reply.users]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("allocsvc_learning_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_models_reach_every_replica_survive_restarts_and_cluster_embeddings(
    fresh_db: str, launch: Callable[..., Server]
) -> None:
    metrics_port = free_port()
    one = launch("--postgres-dsn", fresh_db, "--seed", "7", "--metrics-port", str(metrics_port))
    two = launch("--postgres-dsn", fresh_db, "--seed", "8")
    auto_experiment(one, "auto-one")
    auto_experiment(two, "auto-two")
    training = [(f"train-{i}", i % 4) for i in range(800)]
    assert set(segments(one, "auto-one", training, seed=1)) == {"cluster:none"}

    # A clustering model trained on one serves on two (which saw no traffic to train on).
    trained = finish(one, one.admin.TrainClusters(pb.TrainClustersRequest(), timeout=30))
    assert (trained.version, trained.k, trained.embedding_version) == (1, 4, 0)
    on_two = eventually(
        "two adopts version 1", lambda: status_of(two).version == 1 and status_of(two)
    )
    assert (on_two.k, list(on_two.cluster_sizes)) == (4, list(trained.cluster_sizes))
    fresh = [(f"fresh-{i}", i % 4) for i in range(200)]
    keys_one = segments(one, "auto-one", fresh, seed=2)
    keys_two = segments(two, "auto-two", fresh, seed=2)
    assert keys_one == keys_two
    by_kind = {
        kind: {k for (_, kd), k in zip(fresh, keys_one, strict=True) if kd == kind}
        for kind in range(4)
    }
    assert all(len(keys) == 1 for keys in by_kind.values()), by_kind
    assert len(set.union(*by_kind.values())) == 4

    # Embeddings trained on one: two answers FindSimilarUsers identically.
    finish(one, one.admin.TrainEmbeddings(pb.TrainEmbeddingsRequest(epochs=10), timeout=30))
    kind_of = dict(training + fresh)
    answers = {user: similar(one, user) for user in ("train-0", "train-1", "train-2", "train-3")}
    for user, found in answers.items():
        assert len(found) == 10 and all(kind_of[u] == kind_of[user] for u, _ in found), found
    eventually("two loads embeddings", lambda: similar(two, "train-0"))
    assert {user: similar(two, user) for user in answers} == answers

    # Clustering on the embeddings: the model carries its encoder to the other replica.
    job = one.admin.TrainClusters(pb.TrainClustersRequest(use_embeddings=True), timeout=30)
    on_embeddings = finish(one, job)
    assert (on_embeddings.version, on_embeddings.embedding_version) == (2, 1)
    eventually("two adopts version 2", lambda: status_of(two).version == 2)
    again = [(f"again-{i}", i % 4) for i in range(200)]
    keys_one = segments(one, "auto-one", again, seed=3)
    assert segments(two, "auto-two", again, seed=3) == keys_one
    # Unsupervised embeddings may split a kind (k chosen on them was 8 here), but no cluster
    # mixes two kinds, and every cluster of the model is used.
    kinds_in: dict[str, set[int]] = {}
    for (_, kind), key in zip(again, keys_one, strict=True):
        kinds_in.setdefault(key, set()).add(kind)
    assert all(len(kinds) == 1 for kinds in kinds_in.values()), kinds_in
    assert len(kinds_in) == on_embeddings.k >= 4

    # Training jobs in Prometheus: two clustering jobs and one embeddings job, all succeeded.
    samples = scrape(metrics_port)
    assert samples['allocsvc_learning_jobs_started_total{kind="clusters"}'] == 2
    assert samples['allocsvc_learning_jobs_started_total{kind="embeddings"}'] == 1
    assert samples['allocsvc_learning_jobs_finished_total{kind="clusters",state="succeeded"}'] == 2
    assert samples['allocsvc_learning_jobs_failed_total{kind="embeddings"}'] == 0
    assert samples['allocsvc_learning_jobs_running{kind="clusters"}'] == 0
    assert samples['allocsvc_learning_job_last_duration_seconds{kind="embeddings"}'] > 0

    # Restart one: the embedding model, the users' embeddings and the clusters come back.
    assert one.stop() == 0
    restarted = launch("--postgres-dsn", fresh_db, "--seed", "9")
    assert {user: similar(restarted, user) for user in answers} == answers
    status = status_of(restarted)
    assert (status.version, status.embedding_version) == (2, 1)
    later = [(f"later-{i}", i % 4) for i in range(200)]
    assert segments(restarted, "auto-one", later, seed=4) == segments(
        two, "auto-two", later, seed=4
    )
    assert restarted.stop() == 0 and two.stop() == 0
