"""Ctrl-C (SIGINT) stops the server like SIGTERM: in-flight calls finish, buffers are flushed,
the process exits 0 (every other e2e test stops its servers with SIGTERM and checks the same).
SIGUSR1 logs where each task waits; a stop logs each of its steps as it begins."""

from __future__ import annotations

import signal
import threading

import grpc
import pytest
from e2e_support import (
    RPC_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Launcher,
    Server,
    query,
    tail,
    wait_for,
)

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

CLIENTS = 4
# Calls answered before the signal is sent, so that the load is surely running by then.
BEFORE_SIGNAL = 200


def _allocate_until_refused(
    server: Server, worker: int, answered: list[tuple[str, str]], refused: list[grpc.StatusCode]
) -> None:
    """Allocate new users until the server stops answering; record what was acknowledged."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AllocatorStub(channel)
        for i in range(100_000):
            user = f"sigint-{worker}-{i}"
            try:
                reply = stub.Allocate(
                    pb.AllocateRequest(experiment_id="sigint", user_id=user),
                    timeout=RPC_TIMEOUT_S,
                )
            except grpc.RpcError as exc:
                refused.append(exc.code())
                return
            answered.append((user, reply.assignment_id))


def test_sigint_finishes_calls_flushes_and_exits_zero(launcher: Launcher, fresh_db: str) -> None:
    server = launcher.start("--postgres-dsn", fresh_db, "--seed", "5")
    server.create_experiment(Server.experiment("sigint"))
    answered: list[tuple[str, str]] = []
    refused: list[grpc.StatusCode] = []
    clients = [
        threading.Thread(target=_allocate_until_refused, args=(server, w, answered, refused))
        for w in range(CLIENTS)
    ]
    for client in clients:
        client.start()
    while len(answered) < BEFORE_SIGNAL and all(c.is_alive() for c in clients):
        threading.Event().wait(0.01)
    assert len(answered) >= BEFORE_SIGNAL, f"load did not start: {refused}\n{tail(server.log)}"

    server.process.send_signal(signal.SIGINT)
    code = server.process.wait(timeout=STOP_TIMEOUT_S)
    for client in clients:
        client.join(timeout=RPC_TIMEOUT_S)

    assert code == 0, f"exit code {code} after SIGINT:\n{tail(server.log)}"
    # Once it stops accepting, callers are told to go elsewhere; nothing else goes wrong.
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert len(refused) == CLIENTS
    # Every acknowledged allocation reached PostgreSQL before the process exited.
    rows = query(
        fresh_db,
        "SELECT a.id, a.user_id FROM assignments a JOIN experiments e ON e.id = a.experiment_id"
        " WHERE e.key = 'sigint'",
    )
    stored = {(r["user_id"], r["id"]) for r in rows}
    assert set(answered) <= stored, f"{len(set(answered) - stored)} acknowledged, not stored"


def test_sigusr1_logs_where_tasks_wait_and_a_stop_names_its_steps(
    launcher: Launcher, fresh_db: str
) -> None:
    server = launcher.start("--postgres-dsn", fresh_db, "--seed", "5")
    server.create_experiment(Server.experiment("dump"))
    server.process.send_signal(signal.SIGUSR1)
    # The dump's lines are written one by one: read them once its last line says it is whole.
    wait_for("the task dump", lambda: server.logged("tasks logged"), timeout=RPC_TIMEOUT_S)
    tasks = server.logged("task")
    assert len(tasks) == server.logged("tasks logged")[0]["tasks"], tasks
    # The main task waits for the stop signal, in serve_until_signalled (under uvloop's own
    # wrapper coroutine: the whole chain of awaits is logged).
    assert any("in serve_until_signalled" in str(t["awaiting"]) for t in tasks), tasks
    assert any("scheduler.py" in str(t["awaiting"]) for t in tasks), tasks
    # It still serves.
    reply = server.allocator.Allocate(
        pb.AllocateRequest(experiment_id="dump", user_id="u"), timeout=RPC_TIMEOUT_S
    )
    assert reply.assignment_id
    launcher.stop(server)
    steps = [entry["step"] for entry in server.logged("stopping")]
    assert steps[0] == "rpcs" and steps[-1] == "stores (the last flush)", steps
    assert len(server.logged("stopped")) == 1
