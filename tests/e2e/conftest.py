"""The real server process over gRPC.

`start_server(seed=7)` starts `python -m allocsvc serve --in-memory` on a port picked by the server
itself (`--port 0`, read back from its "serving" log line), waits until the standard health check
answers SERVING, and returns sync stubs. Each server is stopped with SIGTERM at the end of the
test, which must exit with code 0. `server` is one shared server per module for tests that only
need isolated experiments (each test uses its own experiment ids).

Test modules get everything through these fixtures (conftest modules are not importable).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
RPC_TIMEOUT_S = 30.0


@dataclass
class ServerProcess:
    """A running `allocsvc serve` process and sync stubs connected to it."""

    process: subprocess.Popen[bytes]
    stderr_path: Path
    port: int
    channel: grpc.Channel
    allocator: pb_grpc.AllocatorStub = field(init=False)
    admin: pb_grpc.AdminStub = field(init=False)
    health: health_pb2_grpc.HealthStub = field(init=False)

    def __post_init__(self) -> None:
        self.allocator = pb_grpc.AllocatorStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    @staticmethod
    def experiment(
        experiment_id: str,
        variants: tuple[str, ...] = ("A", "B"),
        *,
        status: int = pb.EXPERIMENT_STATUS_RUNNING,
        **fields: object,
    ) -> pb.Experiment:
        """An experiment message with plain variants (id = name) and the given extra fields."""
        return pb.Experiment(
            id=experiment_id,
            name=experiment_id,
            status=status,
            variants=[
                pb.Variant(id=v, name=v, payload_json=f'{{"label": "{v}"}}') for v in variants
            ],
            **fields,  # type: ignore[arg-type]
        )

    def create_experiment(self, experiment: pb.Experiment) -> pb.Experiment:
        return self.admin.CreateExperiment(
            pb.CreateExperimentRequest(experiment=experiment), timeout=RPC_TIMEOUT_S
        )

    def stop(self) -> int:
        """SIGTERM, then wait (bounded) for the exit code."""
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"server did not stop within {STOP_TIMEOUT_S} s of SIGTERM:\n{self.stderr()}"
            ) from None


def _serving_port(stderr_path: Path) -> int | None:
    """Port of the "serving" log line, once the server has written it."""
    for line in stderr_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == "serving":
            return int(entry["port"])
    return None


def _launch(tmp_dir: Path, seed: int | None, extra_args: tuple[str, ...]) -> ServerProcess:
    stderr_path = tmp_dir / f"server-{time.monotonic_ns()}.log"
    args = [sys.executable, "-m", "allocsvc", "serve", "--host", "127.0.0.1", "--port", "0"]
    args += ["--in-memory", *extra_args]
    if seed is not None:
        args += ["--seed", str(seed)]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
    deadline = time.monotonic() + START_TIMEOUT_S

    def fail(why: str) -> None:
        if process.poll() is None:
            process.kill()
        process.wait()
        pytest.fail(f"{why}; server stderr:\n{stderr_path.read_text(errors='replace')}")

    port = None
    while port is None:
        if process.poll() is not None:
            fail(f"server exited with code {process.returncode} before serving")
        if time.monotonic() > deadline:
            fail(f"server did not log 'serving' within {START_TIMEOUT_S} s")
        port = _serving_port(stderr_path)
        if port is None:
            time.sleep(0.05)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    server = ServerProcess(process, stderr_path, port, channel)
    while True:
        if process.poll() is not None:
            channel.close()
            fail(f"server exited with code {process.returncode} before reporting SERVING")
        try:
            reply = server.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return server
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            channel.close()
            fail(f"health check not SERVING within {START_TIMEOUT_S} s")
        time.sleep(0.05)


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Factory: `start_server(seed=7, extra_args=())` starts a fresh server for this test."""
    started: list[ServerProcess] = []

    def start(seed: int | None = 7, extra_args: tuple[str, ...] = ()) -> ServerProcess:
        server = _launch(tmp_path, seed, extra_args)
        started.append(server)
        return server

    yield start
    failures = []
    for server in started:
        code = server.stop()
        if code != 0:
            failures.append(f"server exited with {code} after SIGTERM:\n{server.stderr()}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by a module's tests (seed 7)."""
    running = _launch(tmp_path_factory.mktemp("server"), 7, ())
    yield running
    code = running.stop()
    assert code == 0, f"server exited with {code} after SIGTERM:\n{running.stderr()}"
