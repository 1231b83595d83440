"""Shared helpers of the end-to-end tests: the real `allocsvc serve` process and its stores.

Importable from any test module in this folder (`from e2e_support import Launcher`): pytest's
default import mode puts the folder of a test module, which has no `__init__.py`, on sys.path.

- `Launcher(tmp_path).start(*args)` starts `python -m allocsvc serve --host 127.0.0.1 --port 0
  <args>`, reads the port back from the "serving" log line, waits until the standard health
  check answers SERVING and returns a `Server` with sync stubs. `close()` either stops every
  server with SIGTERM and fails on a non-zero exit code (`graceful=True`), or kills what still
  runs and prints the logs (for tests that kill servers on purpose).
- `launch_process(tmp, *args)` / `stop_process(...)`: the bare process and a channel, for tests
  that only need the serving line (regions, GDPR).
- `log_entries(log, msg)` / `Server.logged(msg)`: the server's JSON log entries with a message.
- `query` / `fetch`: one SQL statement on its own asyncpg connection (sync / async).
- `wait_for`, `free_port`, `bearer`, `write_config`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
RPC_TIMEOUT_S = 30.0
# How long a test waits for another replica to know a new experiment: it reads experiments at
# its next poll (1 s), so this only bounds a wait on a loaded machine.
SEEN_S = 10.0
LOG_TAIL_CHARS = 20_000
SERVE = (sys.executable, "-m", "allocsvc", "serve", "--host", "127.0.0.1", "--port", "0")
_LOG_NUMBERS = itertools.count()


# The server process --------------------------------------------------------------------------


def log_entries(log: Path, msg: str) -> list[dict[str, object]]:
    """The JSON log entries with this message written so far (a line still being written, or
    one that is not JSON, is left out)."""
    entries = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == msg:
            entries.append(entry)
    return entries


def serving_port(log: Path) -> int | None:
    """Port of the "serving" log line, once the server has written it."""
    serving = log_entries(log, "serving")
    return int(str(serving[0]["port"])) if serving else None


def tail(log: Path, chars: int = LOG_TAIL_CHARS) -> str:
    return log.read_text(errors="replace")[-chars:]


def spawn(
    args: tuple[str, ...], log: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`allocsvc serve <args>` on a port of its own choosing, stderr to `log`."""
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [*SERVE, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, **env} if env else None,
        )


def _give_up(process: subprocess.Popen[bytes], log: Path, why: str) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    pytest.fail(f"{why}; server log:\n{tail(log)}")


def wait_serving(process: subprocess.Popen[bytes], log: Path, deadline: float) -> int:
    """The port, once the process has logged "serving"; kills it and fails the test otherwise."""
    while (port := serving_port(log)) is None:
        if process.poll() is not None:
            _give_up(process, log, f"server exited with code {process.returncode} before serving")
        if time.monotonic() > deadline:
            _give_up(process, log, "server did not log 'serving' in time")
        time.sleep(0.02)
    return port


@dataclass
class Server:
    """A running `allocsvc serve` process and sync stubs connected to it."""

    process: subprocess.Popen[bytes]
    log: Path
    port: int
    channel: grpc.Channel = field(init=False)
    allocator: pb_grpc.AllocatorStub = field(init=False)
    admin: pb_grpc.AdminStub = field(init=False)
    health: health_pb2_grpc.HealthStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target)
        self.allocator = pb_grpc.AllocatorStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def logged(self, msg: str) -> list[dict[str, object]]:
        """The JSON log entries with this message, so far."""
        return log_entries(self.log, msg)

    def alive(self) -> bool:
        return self.process.poll() is None

    def healthy(self, service: str = "") -> bool:
        """Whether the health check of `service` ("" = the server) answers SERVING."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = self.health.Check(request, timeout=1.0)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def stop(self) -> int:
        """SIGTERM, then the exit code (bounded wait; killed and failed if it does not exit)."""
        self.channel.close()
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_dumping_tasks(self.process)
            raise AssertionError(
                f"server did not stop within {STOP_TIMEOUT_S} s of SIGTERM:\n{tail(self.log)}"
            ) from None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        self.channel.close()

    # Admin shortcuts ---------------------------------------------------------------------------

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

    def knows(self, experiment_id: str) -> bool:
        """Whether this server knows the experiment yet (NOT_FOUND, or no answer within 5 s on a
        loaded machine, is "not yet"; any other failure raises)."""
        request = pb.GetExperimentRequest(experiment_id=experiment_id)
        try:
            self.admin.GetExperiment(request, timeout=5.0)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False
            raise
        return True


class Launcher:
    """Starts servers in `tmp_dir` (logs `server-<n>.log`, n unique in the session) with `env`
    added to the environment.

    `close()` with `graceful=True` stops every server still running with SIGTERM and fails if any
    exits with a non-zero code; otherwise it kills what still runs and prints each log (pytest
    shows them only when the test failed).
    """

    def __init__(
        self, tmp_dir: Path, *, env: Mapping[str, str] | None = None, graceful: bool = False
    ) -> None:
        self._tmp = tmp_dir
        self._env = env
        self._graceful = graceful
        self._processes: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.servers: list[Server] = []

    def start(self, *args: str, env: Mapping[str, str] | None = None) -> Server:
        return self.start_together(1, *args, env=env)[0]

    def start_together(
        self, count: int, *args: str, env: Mapping[str, str] | None = None
    ) -> list[Server]:
        """`count` processes of `allocsvc serve <args>` started at once, each SERVING."""
        pending = []
        for _ in range(count):
            log = self._tmp / f"server-{next(_LOG_NUMBERS)}.log"
            process = spawn(args, log, {**(self._env or {}), **(env or {})})
            self._processes.append((process, log))
            pending.append((process, log))
        deadline = time.monotonic() + START_TIMEOUT_S
        servers = []
        for process, log in pending:
            server = Server(process, log, wait_serving(process, log, deadline))
            self.servers.append(server)
            while not server.healthy():
                if not server.alive():
                    _give_up(
                        process, log, f"server exited with {process.returncode} before SERVING"
                    )
                if time.monotonic() > deadline:
                    _give_up(process, log, f"health check not SERVING within {START_TIMEOUT_S} s")
                time.sleep(0.02)
            servers.append(server)
        return servers

    def stop(self, server: Server) -> None:
        """SIGTERM one server; it must exit with code 0."""
        code = server.stop()
        assert code == 0, f"exit code {code} after SIGTERM:\n{tail(server.log)}"

    def close(self) -> None:
        if self._graceful:
            codes = [(s, s.stop()) for s in self.servers if s.process.returncode is None]
            bad = [f"exit {code}:\n{tail(s.log, 5_000)}" for s, code in codes if code != 0]
            assert not bad, "\n".join(bad)
            return
        for server in self.servers:
            server.channel.close()
        for process, log in self._processes:
            if process.poll() is None:
                process.kill()
            process.wait()
            print(f"--- {log.name} (exit {process.returncode}):\n{tail(log)}")


def launch_process(
    tmp: Path, *args: str, timeout: float = START_TIMEOUT_S
) -> tuple[subprocess.Popen[bytes], grpc.Channel, Path]:
    """`allocsvc serve <args>` and an insecure channel to it, once it has logged "serving"."""
    log = tmp / f"server-{next(_LOG_NUMBERS)}.log"
    process = spawn(args, log)
    port = wait_serving(process, log, time.monotonic() + timeout)
    return process, grpc.insecure_channel(f"127.0.0.1:{port}"), log


def stop_process(
    process: subprocess.Popen[bytes], channel: grpc.Channel, timeout: float = STOP_TIMEOUT_S
) -> int:
    """Close the channel, SIGTERM, and the exit code (killed after `timeout` seconds, once
    SIGUSR1 had it log where its tasks wait: the caller's assertion shows the log)."""
    channel.close()
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return kill_dumping_tasks(process)


def kill_dumping_tasks(process: subprocess.Popen[bytes]) -> int:
    """Kill a server that did not stop, once SIGUSR1 had it log where each of its tasks waits
    (server.dump_tasks); its exit code."""
    process.send_signal(signal.SIGUSR1)
    time.sleep(1.0)
    process.kill()
    return process.wait()


# Stores, waiting, configuration --------------------------------------------------------------


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """One statement on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def query(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """`fetch` from sync code."""
    return asyncio.run(fetch(dsn, sql, *args))


def wait_for(what: str, check: Callable[[], object], timeout: float, poll: float = 0.05) -> None:
    """Poll `check` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(poll)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying `token` as a bearer credential."""
    return (("authorization", f"Bearer {token}"),)


def write_config(path: Path, **sections: object) -> Path:
    """A YAML settings file made of the given top-level keys."""
    path.write_text(yaml.safe_dump(sections))
    return path
