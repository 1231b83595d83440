"""`allocsvc experiments create|list|show|pause|resume` against the real server process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from allocsvc.cli import main
from allocsvc.client import Client

pytestmark = pytest.mark.e2e


def _run(target: str, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, ["experiments", *args, "--target", target], input=stdin)


def test_create_from_flags_list_show_pause_resume(server) -> None:  # type: ignore[no-untyped-def]
    t = server.target
    made = _run(
        t,
        "create",
        "--id",
        "cli-flags",
        "--variant",
        "green=Green button",
        "--variant",
        "blue",
        "--status",
        "running",
        "--segment-by",
        "source,device",
        "--min-samples",
        "50",
        "--exploration",
        "conservative",
    )
    assert made.exit_code == 0, made.output
    assert made.output.strip() == "created cli-flags (running, 2 variants)"

    with Client(t) as client:
        stored = client.get_experiment("cli-flags")
        assert [v.name for v in stored.variants] == ["Green button", "blue"]
        assert list(stored.segmentation.segment_by) == ["source", "device"]
        assert stored.segmentation.min_samples_per_segment == 50
        for i in range(30):
            a = client.allocate("cli-flags", f"u{i}", context={"utm_source": "google"})
            if i < 6:
                client.record_conversion(a.assignment_id)

    listed = _run(t, "list", "--json")
    assert listed.exit_code == 0, listed.output
    row = next(e for e in json.loads(listed.output) if e["id"] == "cli-flags")
    assert row["status"] == "EXPERIMENT_STATUS_RUNNING"

    table = _run(t, "list", "--status", "running")
    lines = table.output.splitlines()
    assert lines[0].split() == ["id", "name", "status", "policy", "variants", "segments"]
    assert any(line.split()[:3] == ["cli-flags", "cli-flags", "running"] for line in lines[2:])
    assert "source>device" in table.output

    shown = _run(t, "show", "cli-flags", "--json")
    assert shown.exit_code == 0, shown.output
    detail = json.loads(shown.output)
    assert sum(v["allocations"] for v in detail["variants"]) == 30
    assert sum(v["conversions"] for v in detail["variants"]) == 6
    human = _run(t, "show", "cli-flags")
    assert "status running, policy thompson, segments source>device" in human.output

    paused = _run(t, "pause", "cli-flags")
    assert (paused.exit_code, paused.output.strip()) == (0, "cli-flags is paused")
    assert "cli-flags" not in _run(t, "list", "--status", "running").output
    resumed = _run(t, "resume", "cli-flags", "--json")
    assert json.loads(resumed.output)["status"] == "EXPERIMENT_STATUS_RUNNING"


def test_create_from_yaml_and_json_files(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "experiments.yaml"
    spec.write_text(
        "experiments:\n"
        "  - id: cli-yaml-1\n"
        "    status: running\n"
        "    policy: fixed\n"
        "    variants:\n"
        "      - {id: a, weight: 3, payload: {color: red}}\n"
        "      - {id: b, weight: 1}\n"
        "  - id: cli-yaml-2\n"
        "    variants: [x, y, z]\n"
    )
    made = _run(server.target, "create", str(spec), "--json")
    assert made.exit_code == 0, made.output
    created = json.loads(made.output)
    assert [e["id"] for e in created] == ["cli-yaml-1", "cli-yaml-2"]
    assert created[0]["policy"] == "ALLOCATION_POLICY_FIXED"
    assert created[0]["variants"][0]["payload_json"] == '{"color":"red"}'
    assert created[1]["status"] == "EXPERIMENT_STATUS_DRAFT"

    # JSON from stdin, with a flag overriding the file.
    doc = json.dumps({"id": "ignored", "variants": ["p", "q"], "status": "running"})
    piped = _run(server.target, "create", "-", "--id", "cli-stdin", stdin=doc)
    assert piped.exit_code == 0, piped.output
    with Client(server.target) as client:
        assert client.get_experiment("cli-stdin").status == 2


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("show", "no-such"), 3, "NOT_FOUND"),
        (("pause", "no-such"), 3, "NOT_FOUND"),
        (("create", "--id", "cli-dup", "--variant", "a", "--variant", "b"), 4, "ALREADY_EXISTS"),
        (("create", "--id", "cli-one", "--variant", "a"), 2, "INVALID_ARGUMENT"),
        (("create", "--variant", "a", "--variant", "b"), 2, "needs an id"),
        (("create", "--id", "x", "--weights", "1,2"), 2, "one weight per --variant"),
        (("list", "--status", "sleeping"), 2, "Invalid value"),
    ],
)
def test_errors_have_clear_messages_and_exit_codes(  # type: ignore[no-untyped-def]
    server, args: tuple[str, ...], code: int, message: str
) -> None:
    with Client(server.target) as client:
        if not [e for e in client.list_experiments() if e.id == "cli-dup"]:
            client.create_experiment({"id": "cli-dup", "variants": ["a", "b"]})
    result = _run(server.target, *args)
    assert result.exit_code == code, result.output
    assert message in result.output


def test_archived_experiment_cannot_resume(server) -> None:  # type: ignore[no-untyped-def]
    with Client(server.target) as client:
        client.create_experiment({"id": "cli-archived", "variants": ["a", "b"]})
        client.set_status("cli-archived", "archived")
    result = _run(server.target, "resume", "cli-archived")
    assert result.exit_code == 4
    assert "FAILED_PRECONDITION" in result.output


def test_installed_command_exit_codes(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The real `python -m allocsvc` process: a bad file and an unreachable server."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: [unclosed\n")
    base = [sys.executable, "-m", "allocsvc", "experiments"]
    parsed = subprocess.run(
        [*base, "create", str(bad), "--target", server.target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert parsed.returncode == 2
    assert "not valid YAML/JSON" in parsed.stderr
    down = subprocess.run(
        [*base, "list", "--target", "127.0.0.1:1", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 5
    assert "UNAVAILABLE" in down.stderr
