"""The `allocsvc` command."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from allocsvc.config import ConfigError, load_settings


@click.group()
@click.version_option(package_name="allocsvc")
def main() -> None:
    """allocsvc: experiment allocation over gRPC."""


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, exists=True),
    help="YAML or JSON settings file.",
)
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on (default 50051; 0 picks one).")
@click.option("--workers", type=int, help="Processes sharing the port (SO_REUSEPORT).")
@click.option("--seed", type=int, help="Seed of the sampler, for reproducible runs.")
@click.option("--postgres-dsn", help="Use this PostgreSQL instead of the embedded one.")
@click.option("--redis-url", help="Share state with other replicas through this Redis.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded PostgreSQL home.")
@click.option("--in-memory", is_flag=True, default=None, help="Keep all state in the process.")
@click.option("--migrate/--no-migrate", default=None, help="Apply migrations at start (default).")
def serve(config_file: Path | None, **flags: object) -> None:
    """Start the gRPC server (SIGTERM or Ctrl-C stops it gracefully)."""
    from allocsvc import server

    try:
        settings = load_settings(config_file, **flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(server.run(settings))


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, exists=True),
    help="YAML or JSON settings file.",
)
@click.option("--postgres-dsn", help="The database to migrate (default: the embedded one).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded PostgreSQL home.")
def migrate(config_file: Path | None, **flags: object) -> None:
    """Apply pending SQL migrations from sql/ and list what was applied."""
    import asyncio

    from allocsvc import logs
    from allocsvc.store import EmbeddedPostgres
    from allocsvc.store import migrate as apply

    try:
        settings = load_settings(config_file, **flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    logs.configure(settings.log_level)
    embedded = None
    dsn = settings.postgres_dsn
    if dsn is None:
        embedded = EmbeddedPostgres(settings.data_dir / "postgres")
        dsn = embedded.start()
    try:
        applied = asyncio.run(apply(dsn))
    finally:
        if embedded is not None:
            embedded.stop()
    click.echo("\n".join(applied) if applied else "nothing to apply: the schema is current")
