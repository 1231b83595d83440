"""The real server process over gRPC.

`start_server(seed=7)` starts `python -m allocsvc serve --in-memory` on a port picked by the server
itself (`--port 0`, read back from its "serving" log line), waits until the standard health check
answers SERVING, and returns sync stubs. Each server is stopped with SIGTERM at the end of the
test, which must exit with code 0. `server` is one shared server per module for tests that only
need isolated experiments (each test uses its own experiment ids).

The process handling lives in `e2e_support.py` (importable by test modules); `ServerProcess`
and `StartServer` stay importable here for type annotations.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from e2e_support import Launcher, fetch
from e2e_support import Server as ServerProcess

from allocsvc.store import migrate

__all__ = ["ServerProcess", "StartServer"]

StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Factory: `start_server(seed=7, extra_args=())` starts a fresh server for this test."""
    launcher = Launcher(tmp_path, graceful=True)

    def start(seed: int | None = 7, extra_args: tuple[str, ...] = ()) -> ServerProcess:
        return launcher.start(*_serve_args(seed, extra_args))

    yield start
    launcher.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by a module's tests (seed 7)."""
    launcher = Launcher(tmp_path_factory.mktemp("server"), graceful=True)
    yield launcher.start(*_serve_args(7, ()))
    launcher.close()


def _serve_args(seed: int | None, extra_args: tuple[str, ...]) -> tuple[str, ...]:
    return ("--in-memory", *extra_args, *(("--seed", str(seed)) if seed is not None else ()))


@pytest.fixture
def second_db(postgres_dsn: str) -> Iterator[str]:
    """A second migrated database on the session's PostgreSQL (another region's store)."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    asyncio.run(fetch(postgres_dsn, f'CREATE DATABASE "{name}"'))
    dsn = urlunsplit(urlsplit(postgres_dsn)._replace(path=f"/{name}"))
    asyncio.run(migrate(dsn))
    yield dsn
    asyncio.run(fetch(postgres_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Starts servers (`launcher.start(*args)`); at teardown kills whatever still runs and
    prints the logs (pytest shows them only when the test failed)."""
    running = Launcher(tmp_path)
    yield running
    running.close()
