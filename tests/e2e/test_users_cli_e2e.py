"""`allocsvc users export|delete` and the client's data-protection and region calls against the
real server process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from allocsvc.cli import main
from allocsvc.client import Client, InvalidArgument, NotFound

pytestmark = pytest.mark.e2e
USER = "cli-user-7"


def _run(target: str, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, ["users", *args, "--target", target], input=stdin)


def _records(export_json: str) -> dict[str, list[dict[str, object]]]:
    """kind -> records of the single region's export."""
    regions = json.loads(export_json)
    out: dict[str, list[dict[str, object]]] = {}
    for region in regions:
        for kinds in region["sources"].values():
            for kind, rows in kinds.items():
                out.setdefault(kind, []).extend(rows)
    return out


def test_export_and_delete(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t = server.target
    server.create_experiment(server.experiment("cli-users-a"))
    server.create_experiment(server.experiment("cli-users-b"))
    with Client(t) as client:
        given = {e: client.allocate(e, USER).assignment_id for e in ("cli-users-a", "cli-users-b")}
        client.allocate("cli-users-a", "someone-else")

    shown = _run(t, "export", USER)
    assert shown.exit_code == 0, shown.output
    held = _records(shown.output)
    assert sorted(r["id"] for r in held["assignments"]) == sorted(given.values())
    assert all(r["user_id"] == USER for r in held["assignments"])

    out = tmp_path / "export.json"
    saved = _run(t, "export", USER, "--output", str(out), "--json")
    assert saved.exit_code == 0, saved.output
    summary = json.loads(saved.output)
    assert summary["records"] == 2 and summary["output"] == str(out)
    assert _records(out.read_text()) == held

    # Not confirmed: nothing is erased, exit code 1.
    declined = _run(t, "delete", USER, "--reason", "ticket 12", stdin="n\n")
    assert declined.exit_code == 1, declined.output
    assert len(_records(_run(t, "export", USER).output)["assignments"]) == 2

    erased = _run(t, "delete", USER, "--reason", "ticket 12", "--yes", "--json")
    assert erased.exit_code == 0, erased.output
    outcome = json.loads(erased.output)
    assert outcome["receipt_id"] and outcome["regions"] == ["local"]
    assert outcome["removed"] == {"local/memory.assignments": 2}
    after = _run(t, "export", USER)
    assert after.exit_code == 0 and _records(after.output) == {}
    with Client(t) as client:
        # The other user is untouched; the erased user is new again.
        assert client.export_user_data("someone-else").records == 1
        assert client.allocate("cli-users-a", USER).assignment_id != given["cli-users-a"]

    confirmed = _run(t, "delete", "nobody", "--reason", "r", stdin="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert "erased nobody in local: 0 records" in confirmed.output

    # Errors map to the experiments CLI's exit codes.
    assert _run(t, "export", USER, "--region", "mars").exit_code == 3
    assert _run(t, "delete", "", "--yes").exit_code == 2
    unreachable = ["users", "export", USER, "--target", "127.0.0.1:1", "--timeout", "0.5"]
    assert CliRunner().invoke(main, unreachable).exit_code == 5


def test_client_region_calls(server) -> None:  # type: ignore[no-untyped-def]
    with Client(server.target) as client:
        listed = client.list_regions()
        assert [r.code for r in listed.regions] == ["local"] and listed.default_region == "local"
        assert client.get_region("local").serving
        with pytest.raises(NotFound):
            client.get_region("mars")
        # A region known to the routing table but not served: the RPC says so.
        added = client.upsert_region({"code": "eu-west", "countries": ["de", "FR"]})
        assert list(added.countries) == ["DE", "FR"] and not added.serving
        assert client.get_region("eu-west").countries == ["DE", "FR"]
        with pytest.raises(InvalidArgument) as bad:
            client.upsert_region({"code": "x", "countries": ["Germany"]})
        assert bad.value.field == "region.countries"
