"""`allocsvc users export|delete`: a user's personal data, against a running server (admin).

Exit codes as for `allocsvc experiments`: 0 done; 1 an unexpected server error, or `delete`
not confirmed (nothing erased); 2 bad usage or input; 3 not found (an unknown region); 5 server
unreachable or too slow, or a region's store down; 6 not allowed (UNAUTHENTICATED /
PERMISSION_DENIED).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from allocsvc.commands.common import connect, connection_options, echo_json


@click.group()
def users() -> None:
    """Export or erase everything held on a user (data protection; audited).

    \b
    Exit codes: 0 done, 1 server error or delete not confirmed, 2 bad input,
    3 unknown region, 5 server or a store unreachable, 6 not allowed.
    """


_region_option = click.option(
    "--region", default="", help="Only this region's stores (default: every region served)."
)


@users.command()
@click.argument("user_id")
@_region_option
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the export to this file instead of stdout.",
)
@click.option("--json", "as_json", is_flag=True, help="With --output: print the summary as JSON.")
@connection_options()
def export(
    user_id: str,
    region: str,
    output: Path | None,
    as_json: bool,
    target: str,
    token: str | None,
    timeout: float,
) -> None:
    """Everything held on USER_ID, as JSON (one object per region holding any data)."""
    with connect(target, token, timeout) as client:
        answer = client.export_user_data(user_id, region)
    data = json.dumps(json.loads(answer.json), indent=2, sort_keys=True)
    if output is None:
        click.echo(data)
        return
    try:
        output.write_text(data + "\n")
    except OSError as exc:
        raise click.BadParameter(f"{output}: {exc.strerror}", param_hint="--output") from None
    summary = {
        "user_id": answer.user_id,
        "regions": list(answer.regions),
        "records": answer.records,
        "output": str(output),
    }
    if as_json:
        echo_json(summary)
    else:
        where = ", ".join(answer.regions) or "no region"
        click.echo(f"exported {answer.records} records on {user_id} ({where}) to {output}")


@users.command()
@click.argument("user_id")
@_region_option
@click.option("--reason", default="", help="Why (e.g. a ticket number); must not hold the id.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@connection_options()
def delete(
    user_id: str,
    region: str,
    reason: str,
    yes: bool,
    as_json: bool,
    target: str,
    token: str | None,
    timeout: float,
) -> None:
    """Erase everything held on USER_ID (anonymous aggregate counts stay). Cannot be undone."""
    if not yes:
        where = f"region {region}" if region else "every region"
        click.confirm(f"Erase all data on {user_id!r} in {where}?", abort=True, err=True)
    with connect(target, token, timeout) as client:
        answer = client.delete_user_data(user_id, region, reason)
    if as_json:
        echo_json(
            {
                "user_id": user_id,
                "receipt_id": answer.receipt_id,
                "regions": list(answer.regions),
                "removed": dict(sorted(answer.removed.items())),
            }
        )
        return
    removed = sum(answer.removed.values())
    click.echo(
        f"erased {user_id} in {', '.join(answer.regions)}: {removed} records"
        f" (receipt {answer.receipt_id})"
    )
