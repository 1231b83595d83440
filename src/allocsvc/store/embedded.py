"""An embedded PostgreSQL server (the `pgserver` package) for the single-process default.

The server listens on a unix socket inside its data directory (no TCP port), so several instances
never collide. Data survives stop/start with the same directory. When several processes start an
instance on the same directory they share one server; the last one to stop shuts it down (pgserver
counts the handles). Start and stop block for up to a few seconds: call them from a thread
(`asyncio.to_thread`) when an event loop is running.

Run as root, pgserver starts postgres as a system user `pgserver` (created if missing) and opens
read/traverse permissions on the parents of the data directory, as initdb refuses to run as root.

The server's `postgresql.conf` gets `SETTINGS` (checkpoints spaced out); an operator's ALTER SYSTEM
still overrides them.
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any
from urllib.parse import quote

__all__ = ["DEFAULT_DATA_DIR", "EmbeddedPostgres"]

DEFAULT_DATA_DIR = Path("allocsvc-data") / "postgres"

log = logging.getLogger(__name__)

# PostgreSQL's defaults (1GB, 5min) checkpoint a server under load every ten seconds or so once
# `assignments` holds millions of rows, and after each checkpoint the next change to every index
# page writes the whole page to the WAL: at 20M stored rows 4.7 kB of WAL a new assignment instead
# of 0.46, and a quarter more of PostgreSQL's CPU (bench/RESULTS.md item 71). Spaced out, a crash
# replays more WAL on the next start (at most about max_wal_size), and loses nothing more.
SETTINGS = {"max_wal_size": "4GB", "checkpoint_timeout": "15min"}
_SET_BY = "# set by allocsvc (allocsvc.store.embedded.SETTINGS)"


class EmbeddedPostgres:
    """Start and stop a PostgreSQL server living under `data_dir`; idempotent both ways."""

    def __init__(self, data_dir: str | Path = DEFAULT_DATA_DIR, *, database: str = "postgres"):
        self._data_dir = Path(data_dir).expanduser().resolve()
        self._database = database
        self._server: Any = None
        self._dsn: str | None = None

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def dsn(self) -> str | None:
        """The DSN of the running server, None when stopped."""
        return self._dsn

    @property
    def log_path(self) -> Path:
        """The server's log file (pgserver writes it inside the data directory)."""
        return self._data_dir / "log"

    def start(self) -> str:
        """Initialise the data directory if it is new, start the server, return its DSN."""
        if self._dsn is not None:
            return self._dsn
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        server = _pgserver().get_server(self._data_dir, cleanup_mode="stop")
        self._server = server
        info = server.get_postmaster_info()
        if _configure(self._data_dir / "postgresql.conf"):
            os.kill(int(info.pid), signal.SIGHUP)  # what pg_reload_conf() does
        self._dsn = _dsn(info, self._database)
        return self._dsn

    def stop(self) -> None:
        """Release this process's handle; the server stops when no process holds one."""
        server, self._server, self._dsn = self._server, None, None
        if server is not None:
            server.cleanup()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _pgserver() -> ModuleType:
    # Imported lazily: the import has side effects (a runtime directory and an inter-process lock
    # file) and warns through platformdirs when XDG_RUNTIME_DIR is unset (it then uses /tmp).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver

    return pgserver


def _configure(conf: Path) -> bool:
    """Add `SETTINGS` to the server's configuration file where missing; whether it changed. A
    line added later wins over an earlier one, and ALTER SYSTEM (postgresql.auto.conf, read
    last) over both."""
    try:
        text = conf.read_text()
        missing = [f"{name} = '{value}'" for name, value in SETTINGS.items()]
        missing = [line for line in missing if f"\n{line}  {_SET_BY}\n" not in text]
        if not missing:
            return False
        with conf.open("a") as out:
            out.write("".join(f"\n{line}  {_SET_BY}" for line in missing) + "\n")
    except OSError as exc:  # the server runs as it is; only its checkpoints come sooner
        log.warning("embedded PostgreSQL keeps its checkpoint settings: %s", exc)
        return False
    return True


def _dsn(info: Any, database: str) -> str:
    """A libpq/asyncpg DSN from pgserver's postmaster info (socket preferred over TCP)."""
    if info.socket_dir is not None:
        query = f"host={quote(str(info.socket_dir), safe='/')}"
        if info.port is not None:
            query += f"&port={int(info.port)}"
        return f"postgresql://postgres@/{quote(database)}?{query}"
    if info.port is not None and info.hostname:
        return f"postgresql://postgres@{info.hostname}:{int(info.port)}/{quote(database)}"
    raise RuntimeError(f"embedded postgres reports neither a socket nor a port: {info!r}")
