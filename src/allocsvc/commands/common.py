"""What every CLI command that talks to a server shares: the connection options and the exit
codes of a failed call.

Options: `--target host:port` (ALLOCSVC_TARGET), `--token` (ALLOCSVC_TOKEN, sent as a bearer
token) and `--timeout` (the deadline of each call, in seconds).

Exit codes: 0 done; 1 an unexpected server error; 2 bad usage or input (a flag, a file, or a
request the server rejected as INVALID_ARGUMENT); 3 not found; 4 conflict (the id exists, or the
state does not allow the change); 5 server unreachable or too slow; 6 not allowed
(UNAUTHENTICATED / PERMISSION_DENIED).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from allocsvc.client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, Client, ClientError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_SERVER_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_UNREACHABLE = 5
EXIT_NOT_ALLOWED = 6

EXIT_CODES = {
    "INVALID_ARGUMENT": EXIT_BAD_INPUT,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "ALREADY_EXISTS": EXIT_CONFLICT,
    "FAILED_PRECONDITION": EXIT_CONFLICT,
    "UNAVAILABLE": EXIT_UNREACHABLE,
    "DEADLINE_EXCEEDED": EXIT_UNREACHABLE,
    "UNAUTHENTICATED": EXIT_NOT_ALLOWED,
    "PERMISSION_DENIED": EXIT_NOT_ALLOWED,
}


def connection_options(timeout: float | None = DEFAULT_TIMEOUT_S) -> Callable[[F], F]:
    """`--target` and `--token`, and `--timeout` with this default (None: no `--timeout`
    option, for commands whose own `--timeout` means something else; calls then get the
    client's default deadline)."""

    def decorate(f: F) -> F:
        if timeout is not None:
            f = click.option(
                "--timeout",
                type=float,
                default=timeout,
                show_default=True,
                help="Deadline of each call, in seconds.",
            )(f)
        f = click.option(
            "--token",
            envvar="ALLOCSVC_TOKEN",
            help="Bearer token for the admin API (when enabled).",
        )(f)
        f = click.option(
            "--target",
            default=DEFAULT_TARGET,
            show_default=True,
            envvar="ALLOCSVC_TARGET",
            help="host:port of a running allocsvc server.",
        )(f)
        return f

    return decorate


@contextmanager
def connect(target: str, token: str | None, timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[Client]:
    """A client for the command; a failed call prints `Error: CODE: details` on stderr and exits
    with the code of EXIT_CODES (1 for any other status)."""
    try:
        with Client(target, timeout=timeout, token=token) as client:
            yield client
    except ClientError as exc:
        click.echo(f"Error: {exc.code.name}: {exc.details}", err=True)
        raise click.exceptions.Exit(EXIT_CODES.get(exc.code.name, EXIT_SERVER_ERROR)) from None


def echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))
