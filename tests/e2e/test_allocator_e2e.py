"""The Allocator and Admin services, health and reflection, against the real server process."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import descriptor_pool, field_mask_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from allocsvc._proto import allocsvc_pb2 as pb

if TYPE_CHECKING:
    from conftest import ServerProcess, StartServer

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
DESKTOP_CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)


def _error(call: Callable[[], object]) -> grpc.RpcError:
    """Run a zero-argument RPC call that must fail and return its error."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _allocate(
    server: ServerProcess, experiment_id: str, user_id: str, **kw: object
) -> pb.AllocateResponse:
    return server.allocator.Allocate(
        pb.AllocateRequest(experiment_id=experiment_id, user_id=user_id, **kw),  # type: ignore[arg-type]
        timeout=RPC_TIMEOUT_S,
    )


def _update(server: ServerProcess, message: pb.Experiment, *paths: str) -> pb.Experiment:
    return server.admin.UpdateExperiment(
        pb.UpdateExperimentRequest(
            experiment=message, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        ),
        timeout=RPC_TIMEOUT_S,
    )


# Health and reflection ---------------------------------------------------------------------


def test_health_reports_serving_for_the_server_and_each_service(server: ServerProcess) -> None:
    for name in ("", "allocsvc.v1.Allocator", "allocsvc.v1.Admin"):
        reply = server.health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    err = _error(
        lambda: server.health.Check(health_pb2.HealthCheckRequest(service="nope.V1"), timeout=5)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_both_services(server: ServerProcess) -> None:
    database = ProtoReflectionDescriptorDatabase(server.channel)
    services = set(database.get_services())
    assert {"allocsvc.v1.Allocator", "allocsvc.v1.Admin", "grpc.health.v1.Health"} <= services
    pool = descriptor_pool.DescriptorPool(database)
    allocator = pool.FindServiceByName("allocsvc.v1.Allocator")
    assert {m.name for m in allocator.methods} == {
        "Allocate",
        "AllocateBatch",
        "RecordConversion",
        "RecordConversionBatch",
    }
    admin = pool.FindServiceByName("allocsvc.v1.Admin")
    assert {"CreateExperiment", "GetExperiment", "ListExperiments", "UpdateExperiment"} <= {
        m.name for m in admin.methods
    }
    assert allocator.methods_by_name["Allocate"].output_type.full_name == (
        "allocsvc.v1.AllocateResponse"
    )


def test_reflection_resolves_method_symbols(server: ServerProcess) -> None:
    # What ghz --call allocsvc.v1.Allocator/Allocate and grpcurl describe ask for.
    database = ProtoReflectionDescriptorDatabase(server.channel)
    for symbol in ("allocsvc.v1.Allocator.Allocate", "allocsvc.v1.Admin.RebuildTree"):
        found = database.FindFileContainingSymbol(symbol)
        assert found.name == "allocsvc/v1/allocsvc.proto"
    fresh = ProtoReflectionDescriptorDatabase(server.channel)  # nothing cached client-side
    with pytest.raises(KeyError):
        fresh.FindFileContainingSymbol("allocsvc.v1.Allocator.NoSuchMethod")


# Allocation --------------------------------------------------------------------------------


def test_allocate_answers_every_field(server: ServerProcess) -> None:
    server.create_experiment(
        server.experiment(
            "alloc-fields",
            segmentation=pb.SegmentationConfig(
                mode=pb.SEGMENTATION_MODE_MANUAL,
                segment_by=["source", "device"],
                min_samples_per_segment=100,
            ),
        )
    )
    reply = _allocate(
        server,
        "alloc-fields",
        "user-1",
        context={"utm_source": " Instagram ", "user_agent": IPHONE, "country_code": "US"},
    )
    assert reply.assignment_id
    assert reply.experiment_id == "alloc-fields"
    assert reply.variant_id in {"A", "B"}
    assert reply.variant_name == reply.variant_id
    assert reply.payload_json == f'{{"label": "{reply.variant_id}"}}'
    assert reply.segment_key == "source:instagram|device:mobile"
    # No segment has 100 samples yet: the decision is made at the global level.
    assert reply.cascade_level == 0
    assert 0.0 < reply.propensity <= 1.0
    assert reply.sticky is False
    assert reply.region


def test_returning_user_gets_the_same_sticky_assignment(server: ServerProcess) -> None:
    server.create_experiment(server.experiment("sticky-on", ("A", "B", "C")))
    first = {u: _allocate(server, "sticky-on", u) for u in (f"s{i}" for i in range(30))}
    assert all(not r.sticky for r in first.values())
    for user, earlier in first.items():
        # A different context does not move a sticky user.
        again = _allocate(server, "sticky-on", user, context={"user_agent": DESKTOP_CHROME})
        assert again.sticky is True
        assert again.assignment_id == earlier.assignment_id
        assert again.variant_id == earlier.variant_id
        assert again.segment_key == earlier.segment_key


def test_non_sticky_experiment_allocates_anew(server: ServerProcess) -> None:
    created = server.create_experiment(server.experiment("sticky-off", sticky=False))
    assert created.HasField("sticky") and created.sticky is False
    first = _allocate(server, "sticky-off", "same-user")
    second = _allocate(server, "sticky-off", "same-user")
    assert first.sticky is False and second.sticky is False
    assert first.assignment_id != second.assignment_id


def _create_uniform_experiment(server: ServerProcess) -> None:
    message = server.experiment("uniform-split", ("small", "medium", "large"))
    message.policy = pb.ALLOCATION_POLICY_UNIFORM
    for variant, weight in zip(message.variants, (0.2, 0.3, 0.5), strict=True):
        variant.weight = weight
    server.create_experiment(message)


def _allocate_users(server: ServerProcess, experiment_id: str, users: list[str]) -> list[str]:
    variants: list[str] = []
    for start in range(0, len(users), 10_000):
        chunk = users[start : start + 10_000]
        reply = server.allocator.AllocateBatch(
            pb.AllocateBatchRequest(
                requests=[pb.AllocateRequest(experiment_id=experiment_id, user_id=u) for u in chunk]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        assert len(reply.results) == len(chunk)
        for result in reply.results:
            assert result.WhichOneof("outcome") == "allocation", result
            weight = {"small": 0.2, "medium": 0.3, "large": 0.5}[result.allocation.variant_id]
            assert result.allocation.propensity == pytest.approx(weight, abs=1e-12)
            assert result.allocation.cascade_level == 0
            variants.append(result.allocation.variant_id)
    return variants


def test_uniform_split_follows_weights_and_is_deterministic(start_server: StartServer) -> None:
    users = [f"user-{i}" for i in range(100_000)]
    first_server = start_server(seed=1)
    _create_uniform_experiment(first_server)
    first = _allocate_users(first_server, "uniform-split", users)
    shares = {v: n / len(users) for v, n in Counter(first).items()}
    assert shares["small"] == pytest.approx(0.2, abs=0.01)
    assert shares["medium"] == pytest.approx(0.3, abs=0.01)
    assert shares["large"] == pytest.approx(0.5, abs=0.01)

    # A fresh process with another sampler seed: the split hashes the user id salted with the
    # experiment id only, so the same users land on the same variants.
    second_server = start_server(seed=99)
    _create_uniform_experiment(second_server)
    assert _allocate_users(second_server, "uniform-split", users) == first


def _create_batch_experiment(server: ServerProcess) -> None:
    message = server.experiment(
        "batch-vs-unary",
        ("A", "B", "C"),
        segmentation=pb.SegmentationConfig(
            mode=pb.SEGMENTATION_MODE_MANUAL, segment_by=["source"], min_samples_per_segment=20
        ),
    )
    server.create_experiment(message)


def _requests(n: int) -> list[pb.AllocateRequest]:
    sources = ("google", "instagram", "newsletter")
    return [
        pb.AllocateRequest(
            experiment_id="batch-vs-unary",
            user_id=f"u{i}",
            context={"utm_source": sources[i % 3]},
            timestamp_unix_ms=1_700_000_000_000,
        )
        for i in range(n)
    ]


def test_batch_allocates_exactly_like_unary_calls(
    start_server: StartServer, tmp_path: Path
) -> None:
    requests = _requests(300)
    # Without tree rebuilds no tree ever limits the cascade: both paths serve level 1 too.
    config = tmp_path / "no-tree-rebuilds.yaml"
    config.write_text("hierarchy:\n  enabled: false\n")
    unary_server = start_server(seed=7, extra_args=("--config", str(config)))
    _create_batch_experiment(unary_server)
    unary = [unary_server.allocator.Allocate(r, timeout=RPC_TIMEOUT_S) for r in requests]

    batch_server = start_server(seed=7, extra_args=("--config", str(config)))
    _create_batch_experiment(batch_server)
    reply = batch_server.allocator.AllocateBatch(
        pb.AllocateBatchRequest(requests=requests), timeout=RPC_TIMEOUT_S
    )
    batch = [r.allocation for r in reply.results]
    assert all(r.WhichOneof("outcome") == "allocation" for r in reply.results)

    def decision(a: pb.AllocateResponse) -> tuple[str, str, int, float]:
        return (a.variant_id, a.segment_key, a.cascade_level, a.propensity)

    assert [decision(a) for a in batch] == [decision(a) for a in unary]
    # Not a degenerate sequence: Thompson sampling on a flat prior spreads users.
    assert len({a.variant_id for a in unary}) == 3
    assert {a.cascade_level for a in unary} == {0, 1}


# Conversions -------------------------------------------------------------------------------


def _convert(server: ServerProcess, **kw: object) -> pb.RecordConversionResponse:
    return server.allocator.RecordConversion(
        pb.RecordConversionRequest(**kw),  # type: ignore[arg-type]
        timeout=RPC_TIMEOUT_S,
    )


def test_record_conversion_is_idempotent_per_key(server: ServerProcess) -> None:
    server.create_experiment(server.experiment("conversions"))
    assigned = _allocate(server, "conversions", "buyer")
    aid = assigned.assignment_id

    first = _convert(server, assignment_id=aid, value=12.5, idempotency_key="order-1")
    assert (first.assignment_id, first.variant_id, first.counted) == (
        aid,
        assigned.variant_id,
        True,
    )
    repeat = _convert(server, assignment_id=aid, value=12.5, idempotency_key="order-1")
    assert repeat.counted is False
    other_key = _convert(server, assignment_id=aid, value=3.0, idempotency_key="order-2")
    assert other_key.counted is True

    # Without a key, at most one conversion per assignment.
    assert _convert(server, assignment_id=aid).counted is True
    assert _convert(server, assignment_id=aid).counted is False

    by_user = _convert(
        server, experiment_id="conversions", user_id="buyer", idempotency_key="order-3"
    )
    assert (by_user.assignment_id, by_user.variant_id, by_user.counted) == (
        aid,
        assigned.variant_id,
        True,
    )
    repeat_by_user = _convert(
        server, experiment_id="conversions", user_id="buyer", idempotency_key="order-3"
    )
    assert repeat_by_user.counted is False


def test_record_conversion_for_unknown_assignment_or_user_is_not_found(
    server: ServerProcess,
) -> None:
    server.create_experiment(server.experiment("conversions-missing"))
    err = _error(lambda: _convert(server, assignment_id="no-such-assignment"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-assignment" in (err.details() or "")
    err = _error(lambda: _convert(server, experiment_id="conversions-missing", user_id="ghost"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = _error(lambda: _convert(server, experiment_id="no-such-experiment", user_id="ghost"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_record_conversion_batch_answers_in_order(server: ServerProcess) -> None:
    server.create_experiment(server.experiment("conversions-batch"))
    ids = [_allocate(server, "conversions-batch", f"b{i}").assignment_id for i in range(3)]
    reply = server.allocator.RecordConversionBatch(
        pb.RecordConversionBatchRequest(
            requests=[
                pb.RecordConversionRequest(assignment_id=ids[0]),
                pb.RecordConversionRequest(assignment_id="missing"),
                pb.RecordConversionRequest(assignment_id=ids[1], value=2.0),
                pb.RecordConversionRequest(assignment_id=ids[0]),
            ]
        ),
        timeout=RPC_TIMEOUT_S,
    )
    kinds = [r.WhichOneof("outcome") for r in reply.results]
    assert kinds == ["conversion", "error", "conversion", "conversion"]
    assert reply.results[0].conversion.assignment_id == ids[0]
    assert reply.results[0].conversion.counted is True
    assert reply.results[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert reply.results[2].conversion.assignment_id == ids[1]
    assert reply.results[3].conversion.counted is False


# Admin -------------------------------------------------------------------------------------


def test_admin_create_get_list(server: ServerProcess) -> None:
    draft = server.experiment("admin-draft", status=pb.EXPERIMENT_STATUS_UNSPECIFIED)
    draft.description = "a draft"
    created = server.create_experiment(draft)
    assert created.status == pb.EXPERIMENT_STATUS_DRAFT
    assert created.policy == pb.ALLOCATION_POLICY_THOMPSON
    assert created.sticky is True
    assert created.created_at_unix_ms > 0
    assert created.updated_at_unix_ms == created.created_at_unix_ms
    assert [v.id for v in created.variants] == ["A", "B"]

    got = server.admin.GetExperiment(
        pb.GetExperimentRequest(experiment_id="admin-draft"), timeout=RPC_TIMEOUT_S
    )
    assert got == created

    err = _error(lambda: _allocate(server, "admin-draft", "u"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

    server.create_experiment(server.experiment("admin-list-1"))
    server.create_experiment(server.experiment("admin-list-2"))
    drafts = server.admin.ListExperiments(
        pb.ListExperimentsRequest(status=pb.EXPERIMENT_STATUS_DRAFT), timeout=RPC_TIMEOUT_S
    )
    assert "admin-draft" in [e.id for e in drafts.experiments]
    assert all(e.status == pb.EXPERIMENT_STATUS_DRAFT for e in drafts.experiments)

    # Walk every page of one experiment each: ordered by id, nothing lost or repeated.
    seen: list[str] = []
    token = ""
    for _ in range(1000):
        page = server.admin.ListExperiments(
            pb.ListExperimentsRequest(page_size=1, page_token=token), timeout=RPC_TIMEOUT_S
        )
        assert len(page.experiments) <= 1
        seen += [e.id for e in page.experiments]
        token = page.next_page_token
        if not token:
            break
    everything = server.admin.ListExperiments(pb.ListExperimentsRequest(), timeout=RPC_TIMEOUT_S)
    assert seen == sorted(seen) == [e.id for e in everything.experiments]
    assert {"admin-draft", "admin-list-1", "admin-list-2"} <= set(seen)


def test_admin_unknown_and_duplicate(server: ServerProcess) -> None:
    err = _error(
        lambda: server.admin.GetExperiment(
            pb.GetExperimentRequest(experiment_id="admin-nope"), timeout=RPC_TIMEOUT_S
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    server.create_experiment(server.experiment("admin-dup"))
    err = _error(lambda: server.create_experiment(server.experiment("admin-dup", ("X", "Y"))))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    # The first definition is untouched.
    got = server.admin.GetExperiment(
        pb.GetExperimentRequest(experiment_id="admin-dup"), timeout=RPC_TIMEOUT_S
    )
    assert [v.id for v in got.variants] == ["A", "B"]
    err = _error(lambda: _update(server, server.experiment("admin-nope"), "name"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_admin_status_transitions(server: ServerProcess) -> None:
    server.create_experiment(server.experiment("admin-life"))
    assert _allocate(server, "admin-life", "u1").variant_id in {"A", "B"}

    paused = _update(
        server, pb.Experiment(id="admin-life", status=pb.EXPERIMENT_STATUS_PAUSED), "status"
    )
    assert paused.status == pb.EXPERIMENT_STATUS_PAUSED
    assert paused.updated_at_unix_ms >= paused.created_at_unix_ms
    assert [v.id for v in paused.variants] == ["A", "B"]  # untouched: not in the mask
    err = _error(lambda: _allocate(server, "admin-life", "u2"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

    running = _update(
        server, pb.Experiment(id="admin-life", status=pb.EXPERIMENT_STATUS_RUNNING), "status"
    )
    assert running.status == pb.EXPERIMENT_STATUS_RUNNING
    again = _allocate(server, "admin-life", "u1")
    assert again.sticky is True  # state kept across the pause

    renamed = _update(server, pb.Experiment(id="admin-life", name="Life cycle"), "name")
    assert renamed.name == "Life cycle"
    assert renamed.status == pb.EXPERIMENT_STATUS_RUNNING

    err = _error(
        lambda: _update(server, server.experiment("admin-life", ("A", "B", "C")), "variants")
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

    archived = _update(
        server, pb.Experiment(id="admin-life", status=pb.EXPERIMENT_STATUS_ARCHIVED), "status"
    )
    assert archived.status == pb.EXPERIMENT_STATUS_ARCHIVED
    for target in (pb.EXPERIMENT_STATUS_RUNNING, pb.EXPERIMENT_STATUS_PAUSED):
        err = _error(
            lambda target=target: _update(
                server, pb.Experiment(id="admin-life", status=target), "status"
            )
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = _error(lambda: _allocate(server, "admin-life", "u1"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    got = server.admin.GetExperiment(
        pb.GetExperimentRequest(experiment_id="admin-life"), timeout=RPC_TIMEOUT_S
    )
    assert got.status == pb.EXPERIMENT_STATUS_ARCHIVED


def test_admin_update_in_draft_may_change_variants(server: ServerProcess) -> None:
    server.create_experiment(server.experiment("admin-edit", status=pb.EXPERIMENT_STATUS_DRAFT))
    updated = _update(server, server.experiment("admin-edit", ("A", "B", "C")), "variants")
    assert [v.id for v in updated.variants] == ["A", "B", "C"]
    started = _update(
        server, pb.Experiment(id="admin-edit", status=pb.EXPERIMENT_STATUS_RUNNING), "status"
    )
    assert started.status == pb.EXPERIMENT_STATUS_RUNNING
    assert _allocate(server, "admin-edit", "u").variant_id in {"A", "B", "C"}
    err = _error(lambda: _update(server, pb.Experiment(id="admin-edit"), "handle"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in (err.details() or "")
