"""Forward-only SQL migrations from `sql/NNN_name.sql`, applied by the server's migrate command.

Each migration runs in its own transaction and is recorded in `schema_migrations` with the SHA-256
of its text. A Postgres advisory lock serialises replicas that start together. Editing a migration
that was already applied is refused: add a new file instead.

The canonical files live in the top-level `sql/` directory; `allocsvc/store/sql` is a symlink to it
in a checkout and a real directory in a built wheel (packaged by the `include` rule of
`[tool.maturin]`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

__all__ = [
    "MIGRATION_LOCK_KEY",
    "Migration",
    "MigrationChecksumError",
    "MigrationError",
    "applied_migrations",
    "default_sql_dir",
    "load_migrations",
    "migrate",
]

# Arbitrary constant shared by every replica: pg_advisory_lock key of the migration runner.
MIGRATION_LOCK_KEY = 0x616C6C6F63737663  # "allocsvc" in ASCII

_FILE_NAME = re.compile(r"^(?P<version>\d+)_(?P<name>[A-Za-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migrations on disk cannot be applied to this database."""


class MigrationChecksumError(MigrationError):
    """An applied migration's file has changed since it was applied."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # file stem, e.g. "001_core"
    sql: str
    checksum: str  # hex SHA-256 of the text with normalised line endings


def default_sql_dir() -> Path:
    """The directory holding the migration files, in a wheel or a source checkout."""
    packaged = Path(__file__).parent / "sql"
    if packaged.is_dir():
        return packaged
    # a checkout where the symlink is missing (e.g. git on Windows without symlink support)
    checkout = Path(__file__).resolve().parents[3] / "sql"
    if checkout.is_dir():
        return checkout
    raise MigrationError(f"no migration directory: looked for {packaged} and {checkout}")


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Read and order the migration files; raise on malformed names or duplicate versions."""
    directory = default_sql_dir() if directory is None else directory
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file name must look like 001_name.sql: {path}")
        version = int(match["version"])
        if version in migrations:
            raise MigrationError(
                f"two migrations with version {version}: {migrations[version].name}, {path.stem}"
            )
        # line endings normalised so a CRLF checkout does not look like an edited migration
        text = path.read_bytes().replace(b"\r\n", b"\n")
        migrations[version] = Migration(
            version=version,
            name=path.stem,
            sql=text.decode("utf-8"),
            checksum=hashlib.sha256(text).hexdigest(),
        )
    if not migrations:
        raise MigrationError(f"no migration files in {directory}")
    return [migrations[v] for v in sorted(migrations)]


async def applied_migrations(conn: Any) -> dict[int, tuple[str, str]]:
    """version -> (name, checksum) of the migrations recorded in the database."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
    return {int(r["version"]): (str(r["name"]), str(r["checksum"])) for r in rows}


async def migrate(
    conn_or_dsn: str | asyncpg.Connection | asyncpg.Pool, *, directory: Path | None = None
) -> list[str]:
    """Apply the pending migrations in version order; return the names of those applied.

    Accepts a DSN, a connection or a pool. Safe to run from several processes at once: the second
    one waits for the lock, then finds nothing to do. Applied migrations that have no file (a
    newer release migrated this database) are left alone.
    """
    migrations = load_migrations(directory)
    async with _connection(conn_or_dsn) as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(_CREATE_TABLE)
            applied = await applied_migrations(conn)
            for migration in migrations:
                recorded = applied.get(migration.version)
                if recorded is not None and recorded[1] != migration.checksum:
                    raise MigrationChecksumError(
                        f"migration {migration.name} was changed after it was applied"
                        f" (recorded checksum {recorded[1][:12]}, file {migration.checksum[:12]});"
                        " migrations are forward-only: restore the file and add a new migration"
                    )
            done: list[str] = []
            for migration in migrations:
                if migration.version in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum)"
                        " VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
                done.append(migration.name)
            return done
        finally:
            # A lost connection has released the lock already. One that fails to release it
            # is closed: a pool does not reset sessions (`postgres._reset_connection`), so the
            # lock would stay with the next user of the connection.
            if not conn.is_closed():
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
                except BaseException:
                    conn.terminate()
                    raise


@asynccontextmanager
async def _connection(conn_or_dsn: Any) -> AsyncIterator[Any]:
    if isinstance(conn_or_dsn, str):
        conn = await asyncpg.connect(conn_or_dsn)
        try:
            yield conn
        finally:
            await conn.close()
    elif isinstance(conn_or_dsn, asyncpg.Pool):
        async with conn_or_dsn.acquire() as conn:
            yield conn
    else:
        yield conn_or_dsn
