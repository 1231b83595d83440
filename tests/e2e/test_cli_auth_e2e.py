"""Every CLI command that talks to a server sends `--token` (or ALLOCSVC_TOKEN) as a bearer token,
and a refused call exits with the documented code (6 not allowed) instead of a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from e2e_support import bearer, write_config

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.cli import main
from allocsvc.commands.common import EXIT_CONFLICT, EXIT_NOT_ALLOWED, EXIT_NOT_FOUND

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0
ADMIN = "cli-admin-token-0123456789abcdef"
READ_ONLY = "cli-read-only-token-0123456789"
EXPERIMENT = "cli-auth"


def _run(*args: str, token: str | None = None, env: dict[str, str] | None = None) -> Result:
    tail = ["--token", token] if token is not None else []
    return CliRunner().invoke(main, [*args, *tail], env=env)


@pytest.fixture
def target(start_server: Any, tmp_path: Path) -> str:
    """A server whose Admin service needs a token; one experiment with a few conversions."""
    config = write_config(
        tmp_path / "auth.yaml", auth={"admin_tokens": [ADMIN], "read_only_tokens": [READ_ONLY]}
    )
    server = start_server(extra_args=("--config", str(config)))
    server.admin.CreateExperiment(
        pb.CreateExperimentRequest(experiment=server.experiment(EXPERIMENT)),
        metadata=bearer(ADMIN),
        timeout=RPC_TIMEOUT_S,
    )
    for i in range(40):
        answer = server.allocator.Allocate(
            pb.AllocateRequest(experiment_id=EXPERIMENT, user_id=f"u{i}"), timeout=RPC_TIMEOUT_S
        )
        if i % 4 == 0:
            server.allocator.RecordConversion(
                pb.RecordConversionRequest(assignment_id=answer.assignment_id),
                timeout=RPC_TIMEOUT_S,
            )
    return str(server.target)


COMMANDS = {
    "tree show": ["tree", "show", EXPERIMENT],
    "analyze": ["analyze", EXPERIMENT, "--json"],
    "validate": ["validate", EXPERIMENT, "--json"],
    "experiments show": ["experiments", "show", EXPERIMENT, "--json"],
    "similar-users": ["similar-users", "u1"],
    "train clusters": ["train", "clusters", "--timeout", "5"],
}


def test_every_server_command_is_refused_without_a_token(target: str) -> None:
    for name, args in COMMANDS.items():
        for token in (None, ADMIN + "x"):
            result = _run(*args, "--target", target, token=token)
            assert result.exit_code == EXIT_NOT_ALLOWED, (name, token, result.output)
            assert "UNAUTHENTICATED" in result.output, (name, result.output)
            assert result.exception is None or isinstance(result.exception, SystemExit), name


def test_read_commands_send_the_token(target: str) -> None:
    analyzed = _run(*COMMANDS["analyze"], "--target", target, token=READ_ONLY)
    assert analyzed.exit_code == 0, analyzed.output
    assert {"results", "recommendations"} <= json.loads(analyzed.output).keys()

    validated = _run(*COMMANDS["validate"], "--target", target, token=ADMIN)
    assert validated.exit_code == 0, validated.output
    assert "sample_ratio" in json.loads(validated.output)

    # Past auth, the server's own refusal (no tree without segmentation) maps to 4 (conflict).
    tree = _run(*COMMANDS["tree show"], "--target", target, token=ADMIN)
    assert tree.exit_code == EXIT_CONFLICT, tree.output
    assert "FAILED_PRECONDITION" in tree.output and "segmentation disabled" in tree.output

    # The token can come from the environment, like the target.
    env = {"ALLOCSVC_TOKEN": READ_ONLY, "ALLOCSVC_TARGET": target}
    shown = _run(*COMMANDS["experiments show"], env=env)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["experiment"]["id"] == EXPERIMENT
    # The right token for an unknown experiment: the call is made and answered NOT_FOUND.
    missing = _run("validate", "no-such-experiment", "--target", target, token=ADMIN)
    assert missing.exit_code == EXIT_NOT_FOUND, missing.output


def test_admin_commands_need_the_admin_role(target: str) -> None:
    denied = _run(*COMMANDS["train clusters"], "--target", target, token=READ_ONLY)
    assert denied.exit_code == EXIT_NOT_ALLOWED, denied.output
    assert "PERMISSION_DENIED" in denied.output
    # With the admin token the call gets through auth; the answer is the server's, not auth's.
    similar = _run(*COMMANDS["similar-users"], "--target", target, token=ADMIN)
    assert similar.exit_code != EXIT_NOT_ALLOWED, similar.output
    assert "UNAUTHENTICATED" not in similar.output and "PERMISSION_DENIED" not in similar.output
