"""Store outages under load, against real server processes: Redis killed and restarted, and
PostgreSQL stopped and started. Allocation keeps answering from memory; a conversion is
acknowledged only when it is durable; nothing acknowledged is lost; no process dies.

Each test runs its own store (a redis-server, or a PostgreSQL from pgserver's bundled
binaries on a TCP port), so that it can stop and restart it on the same address.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis
from e2e_support import SEEN_S, Launcher, Server, free_port, query, wait_for
from grpc_health.v1 import health_pb2

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 10.0
REDIS_HEALTH = "allocsvc.store.redis"
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Mobile/15E148 Safari/604.1"
CONTEXT = {"utm_source": "instagram", "user_agent": IPHONE, "country_code": "US"}


def health_status(server: Server, service: str) -> int | None:
    try:
        reply = server.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
    except grpc.RpcError:
        return None
    return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def create_experiment(server: Server, key: str) -> None:
    server.admin.CreateExperiment(
        pb.CreateExperimentRequest(
            experiment=pb.Experiment(
                id=key,
                name=key,
                status=pb.EXPERIMENT_STATUS_RUNNING,
                variants=[pb.Variant(id=v, name=v) for v in ("A", "B", "C")],
                segmentation=pb.SegmentationConfig(
                    mode=pb.SEGMENTATION_MODE_MANUAL, segment_by=["source", "device"]
                ),
            )
        ),
        timeout=RPC_TIMEOUT_S,
    )


# Load ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One RPC of the load: when it was sent and answered, and its status."""

    sent: float
    answered: float
    code: str  # "OK" or the status code's name
    assignment_id: str = ""
    key: str = ""
    sticky: bool = False
    counted: bool = False


@dataclass
class Load:
    """Per replica, one thread allocating (new users, and every fifth request a returning one)
    and one converting those assignments with unique idempotency keys, until stopped."""

    experiment: str
    servers: list[Server]
    allocations: list[list[Answer]] = field(default_factory=list)
    conversions: list[list[Answer]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index, server in enumerate(self.servers):
            made: deque[str] = deque()
            self.allocations.append([])
            self.conversions.append([])
            self.threads += [
                threading.Thread(target=self._allocate, args=(index, server, made), daemon=True),
                threading.Thread(target=self._convert, args=(index, server, made), daemon=True),
            ]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=RPC_TIMEOUT_S + 5)
            assert not thread.is_alive()

    def _allocate(self, index: int, server: Server, made: deque[str]) -> None:
        answers = self.allocations[index]
        first_ids: dict[str, str] = {}
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.AllocatorStub(channel)
            i = 0
            while not self.stop.is_set():
                user = f"r{index}-u{i - 4 if i % 5 == 4 else i}"
                i += 1
                sent = time.monotonic()
                try:
                    reply = stub.Allocate(
                        pb.AllocateRequest(
                            experiment_id=self.experiment, user_id=user, context=CONTEXT
                        ),
                        timeout=RPC_TIMEOUT_S,
                    )
                except grpc.RpcError as exc:
                    answers.append(Answer(sent, time.monotonic(), exc.code().name))
                    continue
                answers.append(
                    Answer(sent, time.monotonic(), "OK", reply.assignment_id, sticky=reply.sticky)
                )
                if first_ids.setdefault(user, reply.assignment_id) != reply.assignment_id:
                    answers[-1].code = "sticky assignment changed"
                if not reply.sticky:
                    made.append(reply.assignment_id)
                time.sleep(0.002)

    def _convert(self, index: int, server: Server, made: deque[str]) -> None:
        answers = self.conversions[index]
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.AllocatorStub(channel)
            n = 0
            while not self.stop.is_set():
                if not made:
                    time.sleep(0.005)
                    continue
                assignment_id, key = made.popleft(), f"order-{n}"
                n += 1
                sent = time.monotonic()
                try:
                    reply = stub.RecordConversion(
                        pb.RecordConversionRequest(
                            assignment_id=assignment_id, idempotency_key=key, value=2.5
                        ),
                        timeout=RPC_TIMEOUT_S,
                    )
                except grpc.RpcError as exc:
                    answers.append(
                        Answer(sent, time.monotonic(), exc.code().name, assignment_id, key)
                    )
                    continue
                answers.append(
                    Answer(
                        sent,
                        time.monotonic(),
                        "OK",
                        assignment_id,
                        key,
                        counted=reply.counted,
                    )
                )
                time.sleep(0.002)

    def count(self, kind: str, code: str = "OK", since: float = 0.0) -> int:
        """Answers of one kind ("allocations"/"conversions") with this code sent after `since`,
        over all replicas; the least of the replicas when each must have them."""
        lists: list[list[Answer]] = getattr(self, kind)
        return min(sum(a.code == code and a.sent >= since for a in list(x)) for x in lists)

    def codes(self, kind: str) -> Counter[str]:
        lists: list[list[Answer]] = getattr(self, kind)
        return Counter(a.code for x in lists for a in x)

    def new_assignments(self) -> set[str]:
        return {
            a.assignment_id for x in self.allocations for a in x if a.code == "OK" and not a.sticky
        }

    def acked(self) -> set[tuple[str, str]]:
        return {(a.assignment_id, a.key) for x in self.conversions for a in x if a.code == "OK"}


def assert_written_behind(dsn: str, experiment: str, assignment_ids: set[str]) -> None:
    """Every new assignment reaches PostgreSQL, and so does its allocation count (one per
    variant at each of the 3 levels of CONTEXT's path)."""

    def written() -> tuple[set[str], int]:
        rows = query(
            dsn,
            "SELECT a.id FROM assignments a JOIN experiments e ON e.id = a.experiment_id"
            " WHERE e.key = $1",
            experiment,
        )
        counted = query(
            dsn,
            "SELECT coalesce(sum(s.allocations), 0) FROM segment_variant_state s"
            " JOIN experiments e ON e.id = s.experiment_id WHERE e.key = $1",
            experiment,
        )[0][0]
        return {r[0] for r in rows}, int(counted)

    deadline = time.monotonic() + 15
    while written() != (assignment_ids, 3 * len(assignment_ids)):
        if time.monotonic() > deadline:
            stored, counted = written()
            pytest.fail(
                f"write-behind: {len(assignment_ids)} new assignments answered,"
                f" {len(stored)} stored ({len(assignment_ids - stored)} missing,"
                f" {len(stored - assignment_ids)} unexpected), {counted} allocation counts"
            )
        time.sleep(0.1)


def assert_conversions_durable(dsn: str, acked: set[tuple[str, str]]) -> None:
    stored = {
        (r[0], r[1]) for r in query(dsn, "SELECT assignment_id, idempotency_key FROM conversions")
    }
    assert acked <= stored, f"{len(acked - stored)} acknowledged conversions missing"


# Redis --------------------------------------------------------------------------------------


class RedisProcess:
    """A redis-server of this test's own, restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.skip("redis-server is not installed")
        self._executable = executable
        self._workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self._executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self._workdir),
                "--save", "",
                "--appendonly", "no",
                "--logfile", str(self._workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            deadline = time.monotonic() + 10
            while True:
                assert self.process.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server not answering"
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.kill()


def test_redis_killed_and_restarted_under_load(
    fresh_db: str, own_redis: RedisProcess, launcher: Launcher
) -> None:
    servers = launcher.start_together(2, "--postgres-dsn", fresh_db, "--redis-url", own_redis.url)
    for server in servers:
        assert health_status(server, REDIS_HEALTH) == SERVING
    create_experiment(servers[0], "outage")
    wait_for("replica two sees the experiment", lambda: servers[1].knows("outage"), timeout=SEEN_S)
    load = Load("outage", servers)
    load.start()
    try:
        wait_for("load", lambda: load.count("conversions") >= 20, timeout=15)
        own_redis.kill()
        down = time.monotonic()
        for server in servers:
            wait_for(
                "health NOT_SERVING while Redis is down",
                lambda s=server: health_status(s, REDIS_HEALTH) == NOT_SERVING,  # type: ignore[misc]
                timeout=5,
            )
            assert health_status(server, "") == SERVING
        wait_for(
            "load while Redis is down",
            lambda: (
                load.count("allocations", since=down) >= 100
                and load.count("conversions", since=down) >= 20
            ),
            timeout=15,
        )
        own_redis.start()
        up = time.monotonic()
        for server in servers:
            wait_for(
                "health SERVING after Redis is back",
                lambda s=server: health_status(s, REDIS_HEALTH) == SERVING,  # type: ignore[misc]
                timeout=10,
            )
        wait_for(
            "load after Redis is back",
            lambda: (
                load.count("allocations", since=up) >= 50
                and load.count("conversions", since=up) >= 10
            ),
            timeout=15,
        )
    finally:
        load.finish()
    assert set(load.codes("allocations")) == {"OK"}, load.codes("allocations")
    assert set(load.codes("conversions")) == {"OK"}, load.codes("conversions")
    assert all(a.counted for x in load.conversions for a in x)
    assert all(server.alive() for server in servers)
    assert_conversions_durable(fresh_db, load.acked())
    assert_written_behind(fresh_db, "outage", load.new_assignments())
    for server in servers:
        assert server.stop() == 0


# PostgreSQL ---------------------------------------------------------------------------------


class PostgresProcess:
    """A PostgreSQL of this test's own (pgserver's binaries) on a TCP port, stopped and started
    with pg_ctl. As root it runs as the `pgserver` system user, as pgserver does."""

    def __init__(self) -> None:
        spec = importlib.util.find_spec("pgserver")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("pgserver is not installed")
        self._bin = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        self._as_user: list[str] = []
        self.home = Path(tempfile.mkdtemp(prefix="allocsvc-pg-"))
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("pgserver")
            except KeyError:
                pytest.skip("running as root without the `pgserver` system user")
            # runuser rather than Popen(user=...): no fork of this process with threads running.
            self._as_user = ["runuser", "-u", "pgserver", "--"]
            os.chown(self.home, owner.pw_uid, owner.pw_gid)
        self.data = self.home / "data"
        self.log = self.home / "postgres.log"
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "utf8")

    def _run(self, program: str, *args: str) -> None:
        # Output to a file: pg_ctl's postmaster inherits the pipes otherwise, and the call hangs.
        with (self.home / "commands.log").open("ab") as out:
            done = subprocess.run(
                [*self._as_user, str(self._bin / program), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=self.home,
                timeout=60,
                check=False,
            )
        if done.returncode != 0:
            raise AssertionError(
                f"{program} failed ({done.returncode}):\n{(self.home / 'commands.log').read_text()}"
                f"\n{self.log.read_text() if self.log.exists() else ''}"
            )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[PostgresProcess]:
    server = PostgresProcess()
    try:
        server.start()
        yield server
    finally:
        server.remove()


def test_postgres_stopped_and_started_under_load(
    own_postgres: PostgresProcess, launcher: Launcher
) -> None:
    dsn = own_postgres.dsn
    servers = launcher.start_together(2, "--postgres-dsn", dsn)
    create_experiment(servers[0], "outage")
    wait_for("replica two sees the experiment", lambda: servers[1].knows("outage"), timeout=SEEN_S)
    load = Load("outage", servers)
    load.start()
    try:
        wait_for("load", lambda: load.count("conversions") >= 20, timeout=15)
        own_postgres.stop()
        down = time.monotonic()
        wait_for(
            "load while PostgreSQL is down",
            lambda: (
                load.count("allocations", since=down) >= 100
                and load.count("conversions", "UNAVAILABLE", since=down) >= 10
            ),
            timeout=15,
        )
        up = time.monotonic()
        own_postgres.start()
        wait_for(
            "conversions acknowledged again after PostgreSQL is back",
            lambda: (
                load.count("conversions", since=up) >= 10
                and load.count("allocations", since=up) >= 50
            ),
            timeout=20,
        )
    finally:
        load.finish()
    assert set(load.codes("allocations")) == {"OK"}, load.codes("allocations")
    assert set(load.codes("conversions")) == {"OK", "UNAVAILABLE"}, load.codes("conversions")
    # Nothing sent and answered while the database was down was acknowledged.
    during = [a for x in load.conversions for a in x if a.sent >= down and a.answered <= up]
    assert during and all(a.code == "UNAVAILABLE" for a in during)
    assert all(a.counted for x in load.conversions for a in x if a.code == "OK")
    assert all(server.alive() for server in servers)
    assert_conversions_durable(dsn, load.acked())
    assert_written_behind(dsn, "outage", load.new_assignments())
    # The replicas still pick up each other's experiments.
    create_experiment(servers[0], "after-outage")
    wait_for("replica two sees a new experiment", lambda: servers[1].knows("after-outage"), SEEN_S)
    for server in servers:
        assert server.stop() == 0
