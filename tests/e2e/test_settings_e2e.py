"""The `contextual` and `hierarchy` settings take effect in a server started with a config file.

The same experiment and the same users go to two servers: one whose config sets contextual
defaults and limits, one with contextual bandits switched off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import yaml

from allocsvc._proto import allocsvc_pb2 as pb

if TYPE_CHECKING:
    from conftest import ServerProcess, StartServer

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Mobile/15E148 Safari/604.1"
USERS = 12


def _config(tmp_path: Path, settings: dict[str, object]) -> tuple[str, ...]:
    path = tmp_path / "allocsvc.yaml"
    path.write_text(yaml.safe_dump(settings))
    return ("--config", str(path))


def _manual(experiment_id: str, *segment_by: str, **segmentation: int) -> pb.Experiment:
    return pb.Experiment(
        id=experiment_id,
        name=experiment_id,
        status=pb.EXPERIMENT_STATUS_RUNNING,
        variants=[pb.Variant(id=v, name=v) for v in ("A", "B")],
        segmentation=pb.SegmentationConfig(
            mode=pb.SEGMENTATION_MODE_MANUAL, segment_by=list(segment_by), **segmentation
        ),
    )


def _allocate_us_phones(server: ServerProcess, experiment_id: str) -> list[pb.AllocateResponse]:
    """USERS new users, all from the US on an iPhone, one after the other."""
    return [
        server.allocator.Allocate(
            pb.AllocateRequest(
                experiment_id=experiment_id,
                user_id=f"{experiment_id}-u{i}",
                context={"country_code": "US", "user_agent": IPHONE, "utm_source": "google"},
            ),
            timeout=RPC_TIMEOUT_S,
        )
        for i in range(USERS)
    ]


def _get(server: ServerProcess, experiment_id: str) -> pb.Experiment:
    return server.admin.GetExperiment(
        pb.GetExperimentRequest(experiment_id=experiment_id), timeout=RPC_TIMEOUT_S
    )


def test_contextual_and_hierarchy_defaults_and_limits(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(
        extra_args=_config(
            tmp_path,
            {
                "contextual": {
                    "context_features": ["country", "device"],
                    "min_samples_per_segment": 7,
                },
                # No automatic rebuilds: until RebuildTree below no tree limits the cascade.
                "hierarchy": {
                    "hierarchy_levels": ["country", "device"],
                    "max_depth": 1,
                    "enabled": False,
                },
            },
        )
    )
    # An experiment that leaves its levels, minimum and depth unset gets the server's.
    server.create_experiment(_manual("filled"))
    filled = _get(server, "filled")
    assert list(filled.segmentation.segment_by) == ["country", "device"]
    assert filled.segmentation.min_samples_per_segment == 7
    assert filled.hierarchy.max_depth == 1

    # Its own settings win over the server's defaults.
    server.create_experiment(_manual("own", "device", min_samples_per_segment=3))
    own = _get(server, "own")
    assert list(own.segmentation.segment_by) == ["device"]
    assert own.segmentation.min_samples_per_segment == 3
    assert own.hierarchy.max_depth == 0

    # A dimension outside context_features is refused, naming the field, at create and update.
    with pytest.raises(grpc.RpcError) as refused:
        server.create_experiment(_manual("sourced", "country", "source"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "segment_by[1]" in (refused.value.details() or "")
    with pytest.raises(grpc.RpcError) as refused:
        server.admin.UpdateSegmentationConfig(
            pb.UpdateSegmentationConfigRequest(
                experiment_id="own",
                config=pb.SegmentationConfig(
                    mode=pb.SEGMENTATION_MODE_MANUAL, segment_by=["source"]
                ),
            ),
            timeout=RPC_TIMEOUT_S,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "segment_by[0]" in (refused.value.details() or "")

    # min_samples_per_segment 7: the first 7 users are served from the global node, the
    # next ones from their own segment.
    answers = _allocate_us_phones(server, "filled")
    assert {a.segment_key for a in answers} == {"country:us|device:mobile"}
    assert [a.cascade_level for a in answers[:7]] == [0] * 7
    assert [a.cascade_level for a in answers[7:]] == [2] * (USERS - 7)

    # max_depth 1: the tree keeps nothing below level 1.
    server.admin.RebuildTree(pb.RebuildTreeRequest(experiment_id="filled"), timeout=RPC_TIMEOUT_S)
    tree = json.loads(
        server.admin.GetTree(
            pb.GetTreeRequest(experiment_id="filled", format="json"), timeout=RPC_TIMEOUT_S
        ).content
    )
    assert tree["levels"] == ["country", "device"]
    assert tree["settings"]["max_depth"] == 1
    assert tree["settings"]["min_samples_per_level"] == [7, 7]
    assert tree["summary"]["pruned_by_reason"].get("beyond_max_depth", 0) >= 1
    deep = [n for n in tree["nodes"] if n["level"] == 2]
    assert deep and not any(n["kept"] for n in deep)


def test_contextual_off_serves_global_posteriors(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(extra_args=_config(tmp_path, {"contextual": {"enabled": False}}))
    server.create_experiment(_manual("flat", "country", "device", min_samples_per_segment=1))
    # The experiment keeps its segmentation config (it applies again once switched back on)...
    stored = _get(server, "flat")
    assert list(stored.segmentation.segment_by) == ["country", "device"]
    # ...but allocation uses the global posteriors only.
    answers = _allocate_us_phones(server, "flat")
    assert {(a.segment_key, a.cascade_level) for a in answers} == {("", 0)}
    with pytest.raises(grpc.RpcError) as refused:
        server.admin.RebuildTree(pb.RebuildTreeRequest(experiment_id="flat"), timeout=RPC_TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "contextual" in (refused.value.details() or "")
