"""An experiment's propensity floor over gRPC: stored and read back, validated, and every
answer's propensity at least the floor once Thompson sampling has a clear winner."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import grpc
import pytest
from click.testing import CliRunner
from google.protobuf import field_mask_pb2

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.cli import main
from allocsvc.client import Client

if TYPE_CHECKING:
    from conftest import ServerProcess

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0
FLOOR = 0.05
USERS = 300


def _experiment(experiment_id: str, floor: float, variants: int = 3) -> pb.Experiment:
    return pb.Experiment(
        id=experiment_id,
        status=pb.EXPERIMENT_STATUS_RUNNING,
        variants=[pb.Variant(id=f"v{i}") for i in range(variants)],
        exploration=pb.ExplorationConfig(
            mode=pb.EXPLORATION_MODE_CONSERVATIVE, propensity_floor=floor
        ),
        sticky=False,
    )


def _answers(server: ServerProcess, experiment_id: str) -> list[tuple[str, float]]:
    """Allocate USERS users; those who get v1 convert. (variant, propensity) of each answer."""
    out = []
    for i in range(USERS):
        answer = server.allocator.Allocate(
            pb.AllocateRequest(experiment_id=experiment_id, user_id=f"u{i}"),
            timeout=RPC_TIMEOUT_S,
        )
        out.append((answer.variant_id, answer.propensity))
        if answer.variant_id == "v1":
            server.allocator.RecordConversion(
                pb.RecordConversionRequest(assignment_id=answer.assignment_id),
                timeout=RPC_TIMEOUT_S,
            )
    return out


def test_the_floor_is_kept_and_bounds_every_propensity(server: ServerProcess) -> None:
    created = server.create_experiment(_experiment("floor-on", FLOOR))
    assert created.exploration.propensity_floor == pytest.approx(FLOOR)
    read = server.admin.GetExperiment(
        pb.GetExperimentRequest(experiment_id="floor-on"), timeout=RPC_TIMEOUT_S
    )
    assert read.exploration.propensity_floor == pytest.approx(FLOOR)
    assert read.exploration.mode == pb.EXPLORATION_MODE_CONSERVATIVE
    server.create_experiment(_experiment("floor-off", 0.0))

    floored = _answers(server, "floor-on")
    plain = _answers(server, "floor-off")
    # v1 converts every time: without a floor its propensity soon exceeds what a floor of
    # FLOOR on the two others allows (1 - 2 FLOOR), and they are no longer chosen.
    assert max(p for _, p in plain) > 1 - 2 * FLOOR + 0.05
    assert max(p for _, p in floored) <= 1 - 2 * FLOOR + 1e-12
    assert min(p for _, p in floored) >= FLOOR
    # With it the losers keep being chosen, late in the run at about the floor.
    late = [(v, p) for v, p in floored[USERS // 2 :] if v != "v1"]
    assert {v for v, _ in late} == {"v0", "v2"}
    assert all(FLOOR <= p < 1.5 * FLOOR for _, p in late), late


def test_the_floor_is_updated_with_exploration_and_validated(server: ServerProcess) -> None:
    server.create_experiment(_experiment("floor-update", 0.0))
    changed = server.admin.UpdateExperiment(
        pb.UpdateExperimentRequest(
            experiment=_experiment("floor-update", 0.1),
            update_mask=field_mask_pb2.FieldMask(paths=["exploration"]),
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert changed.exploration.propensity_floor == pytest.approx(0.1)
    answer = server.allocator.Allocate(
        pb.AllocateRequest(experiment_id="floor-update", user_id="u"), timeout=RPC_TIMEOUT_S
    )
    assert answer.propensity >= 0.1

    for floor, variants, experiment_id in [(-0.01, 3, "floor-bad-a"), (0.5, 2, "floor-bad-b")]:
        with pytest.raises(grpc.RpcError) as info:
            server.create_experiment(_experiment(experiment_id, floor, variants))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "experiment.exploration.propensity_floor" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        server.admin.UpdateExperiment(
            pb.UpdateExperimentRequest(
                experiment=_experiment("floor-update", 0.34),
                update_mask=field_mask_pb2.FieldMask(paths=["exploration"]),
            ),
            timeout=RPC_TIMEOUT_S,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "propensity_floor" in (info.value.details() or "")


def test_the_cli_and_the_client_set_the_floor(server: ServerProcess) -> None:
    made = CliRunner().invoke(
        main,
        [
            "experiments",
            "create",
            "--id",
            "floor-cli",
            "--variant",
            "a",
            "--variant",
            "b",
            "--exploration",
            "aggressive",
            "--propensity-floor",
            "0.02",
            "--json",
            "--target",
            server.target,
        ],
    )
    assert made.exit_code == 0, made.output
    exploration = json.loads(made.output)[0]["exploration"]
    assert exploration == {"mode": "EXPLORATION_MODE_AGGRESSIVE", "propensity_floor": 0.02}
    bad = ["--id", "floor-cli-bad", "--variant", "a", "--variant", "b", "--propensity-floor", "0.5"]
    refused = CliRunner().invoke(main, ["experiments", "create", *bad, "--target", server.target])
    assert refused.exit_code == 2 and "propensity_floor" in refused.output, refused.output

    with Client(server.target) as client:
        created = client.create_experiment(
            {"id": "floor-client", "variants": ["a", "b"], "exploration": {"propensity_floor": 0.1}}
        )
    assert created.exploration.propensity_floor == pytest.approx(0.1)
    assert created.exploration.mode == pb.EXPLORATION_MODE_DEFAULT
