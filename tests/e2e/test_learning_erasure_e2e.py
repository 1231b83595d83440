"""Data protection covers what learning holds: a user's rows of the training sample and their
embedding in the similarity index are exported, and erased by DeleteUserData."""

from __future__ import annotations

import json
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
USERS = 80
ERASED = "learn-7"


def train_embeddings(server: ServerProcess) -> None:
    job = server.admin.TrainEmbeddings(pb.TrainEmbeddingsRequest(epochs=3), timeout=RPC_TIMEOUT_S)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        status = server.admin.GetClusteringStatus(
            pb.GetClusteringStatusRequest(job_id=job.job_id), timeout=RPC_TIMEOUT_S
        )
        if status.job.state != "running":
            assert status.job.state == "succeeded", status.job.message
            return
        assert time.monotonic() < deadline, f"job still running: {status.job}"
        time.sleep(0.25)


def learning_records(server: ServerProcess, user_id: str) -> dict[str, list[dict[str, object]]]:
    reply = server.admin.ExportUserData(
        pb.ExportUserDataRequest(user_id=user_id), timeout=RPC_TIMEOUT_S
    )
    found: dict[str, list[dict[str, object]]] = {}
    for region in json.loads(reply.json):
        found.update(region["sources"].get("learning", {}))
    return found


def similar(server: ServerProcess, user_id: str) -> list[str]:
    reply = server.admin.FindSimilarUsers(
        pb.FindSimilarUsersRequest(user_id=user_id, k=1000), timeout=RPC_TIMEOUT_S
    )
    return [u.user_id for u in reply.users]


def test_erasure_reaches_learning(start_server: StartServer, tmp_path: Path) -> None:
    config = tmp_path / "learning.json"
    # Every allocation feeds learning, so the sample holds each of the user's visits.
    config.write_text(json.dumps({"clustering": {"observe_every": 1}}))
    server = start_server(extra_args=("--config", str(config)))
    server.create_experiment(server.experiment("learn-exp"))
    rng = np.random.default_rng(4)
    sources = ("google", "instagram", "newsletter", "tiktok")
    for i in range(USERS):
        for visit in range(2):
            server.allocator.Allocate(
                pb.AllocateRequest(
                    experiment_id="learn-exp",
                    user_id=f"learn-{i}",
                    context={"utm_source": sources[i % 4]},
                    signals={"pages_viewed": float(rng.integers(1, 20)), "visit": float(visit)},
                ),
                timeout=RPC_TIMEOUT_S,
            )
    train_embeddings(server)

    held = learning_records(server, ERASED)
    assert len(held["training_sample"]) == 2
    assert all(row["source"] == sources[7 % 4] for row in held["training_sample"])
    [indexed] = held["similarity_index"]
    assert indexed["user_id"] == ERASED and len(indexed["embedding"]) == 32  # type: ignore[arg-type]
    assert ERASED in similar(server, "learn-0")
    assert len(similar(server, ERASED)) == USERS - 1

    erased = server.admin.DeleteUserData(
        pb.DeleteUserDataRequest(user_id=ERASED, reason="ticket 77"), timeout=RPC_TIMEOUT_S
    )
    # Two sample rows and one index entry.
    assert erased.removed["local/learning.records"] == 3

    assert learning_records(server, ERASED) == {}
    with pytest.raises(grpc.RpcError) as gone:
        similar(server, ERASED)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    others = similar(server, "learn-0")
    assert ERASED not in others and len(others) == USERS - 2
    assert len(learning_records(server, "learn-8")["training_sample"]) == 2

    # A model trained after the erasure never saw the user: the sample no longer holds them.
    train_embeddings(server)
    assert ERASED not in similar(server, "learn-0")
    assert len(similar(server, "learn-0")) == USERS - 2
