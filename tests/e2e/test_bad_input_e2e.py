"""Bad input is answered with the right status code and a message naming the field.

Every test here talks to one shared server; the last one checks it still allocates correctly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import field_mask_pb2

from allocsvc._proto import allocsvc_pb2 as pb

if TYPE_CHECKING:
    from conftest import ServerProcess

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0
EXPERIMENT = "bad-input"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def ready(server: ServerProcess) -> ServerProcess:
    """The shared server with a running experiment and one paused and one archived."""
    server.create_experiment(server.experiment(EXPERIMENT))
    for name, status in (
        ("bad-input-paused", pb.EXPERIMENT_STATUS_PAUSED),
        ("bad-input-archived", pb.EXPERIMENT_STATUS_ARCHIVED),
    ):
        server.create_experiment(server.experiment(name))
        server.admin.UpdateExperiment(
            pb.UpdateExperimentRequest(
                experiment=pb.Experiment(id=name, status=status),
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            ),
            timeout=RPC_TIMEOUT_S,
        )
    return server


def _fails(call: Callable[[], object], code: grpc.StatusCode, *words: str) -> str:
    """Run an RPC that must fail with `code`; its details must contain every word."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    details = err.details() or ""
    assert err.code() == code, details
    for word in words:
        assert word in details, f"{word!r} not in {details!r}"
    return details


def _allocate(server: ServerProcess, **kw: object) -> Callable[[], object]:
    fields: dict[str, object] = {"experiment_id": EXPERIMENT, "user_id": "someone", **kw}
    request = pb.AllocateRequest(**fields)  # type: ignore[arg-type]
    return lambda: server.allocator.Allocate(request, timeout=RPC_TIMEOUT_S)


def _convert(server: ServerProcess, **kw: object) -> Callable[[], object]:
    request = pb.RecordConversionRequest(**kw)  # type: ignore[arg-type]
    return lambda: server.allocator.RecordConversion(request, timeout=RPC_TIMEOUT_S)


def _create(server: ServerProcess, message: pb.Experiment) -> Callable[[], object]:
    return lambda: server.create_experiment(message)


# Allocate ----------------------------------------------------------------------------------


def test_empty_user_id(ready: ServerProcess) -> None:
    _fails(_allocate(ready, user_id=""), INVALID, "user_id")


def test_oversized_user_id(ready: ServerProcess) -> None:
    assert ready.allocator.Allocate(
        pb.AllocateRequest(experiment_id=EXPERIMENT, user_id="u" * 256), timeout=RPC_TIMEOUT_S
    ).variant_id
    _fails(_allocate(ready, user_id="u" * 257), INVALID, "user_id", "256")


def test_empty_experiment_id(ready: ServerProcess) -> None:
    _fails(_allocate(ready, experiment_id=""), INVALID, "experiment_id")


def test_oversized_experiment_id(ready: ServerProcess) -> None:
    _fails(_allocate(ready, experiment_id="e" * 129), INVALID, "experiment_id", "128")


def test_unknown_experiment(ready: ServerProcess) -> None:
    _fails(_allocate(ready, experiment_id="no-such-experiment"), grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("experiment_id", ["bad-input-paused", "bad-input-archived"])
def test_experiment_not_running(ready: ServerProcess, experiment_id: str) -> None:
    _fails(
        _allocate(ready, experiment_id=experiment_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        experiment_id,
    )


def test_context_with_too_many_entries(ready: ServerProcess) -> None:
    context = {f"key{i}": "v" for i in range(65)}
    details = _fails(_allocate(ready, context=context), INVALID, "context")
    assert "64" in details
    # 64 entries are fine.
    assert _allocate(ready, user_id="sixty-four", context=dict(list(context.items())[:64]))()


def test_context_value_too_long(ready: ServerProcess) -> None:
    _fails(
        _allocate(ready, context={"utm_source": "x" * 257}),
        INVALID,
        "context[utm_source]",
        "256",
    )


def test_context_key_too_long(ready: ServerProcess) -> None:
    _fails(_allocate(ready, context={"k" * 65: "v"}), INVALID, "context[")


def test_bad_country_code(ready: ServerProcess) -> None:
    _fails(_allocate(ready, context={"country_code": "USA"}), INVALID, "context[country_code]")


def test_non_finite_signal(ready: ServerProcess) -> None:
    _fails(_allocate(ready, signals={"pages_viewed": math.inf}), INVALID, "signals[pages_viewed]")


def test_unknown_channel(ready: ServerProcess) -> None:
    _fails(_allocate(ready, channel="carrier-pigeon"), INVALID, "channel")


def test_negative_timestamp(ready: ServerProcess) -> None:
    _fails(_allocate(ready, timestamp_unix_ms=-1), INVALID, "timestamp_unix_ms")


# RecordConversion --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_conversion_value_must_be_finite_and_not_negative(
    ready: ServerProcess, value: float
) -> None:
    assigned = _allocate(ready, user_id=f"value-{value}")()
    aid = assigned.assignment_id  # type: ignore[attr-defined]
    _fails(_convert(ready, assignment_id=aid, value=value), INVALID, "value")
    # Nothing was counted: a valid conversion afterwards is the first one.
    assert _convert(ready, assignment_id=aid, value=1.0)().counted  # type: ignore[attr-defined]


def test_conversion_without_assignment_or_experiment(ready: ServerProcess) -> None:
    _fails(_convert(ready, user_id="someone"), INVALID, "assignment_id")


def test_conversion_with_empty_user(ready: ServerProcess) -> None:
    _fails(_convert(ready, experiment_id=EXPERIMENT, user_id=""), INVALID, "user_id")


# CreateExperiment --------------------------------------------------------------------------


def test_create_with_duplicate_variant_names(ready: ServerProcess) -> None:
    message = ready.experiment("bad-dup-names")
    message.variants[1].name = message.variants[0].name
    _fails(_create(ready, message), INVALID, "experiment.variants[1].name", "duplicate")


def test_create_with_duplicate_variant_ids(ready: ServerProcess) -> None:
    message = ready.experiment("bad-dup-ids", ("A", "B", "A"))
    message.variants[2].name = "another A"
    _fails(_create(ready, message), INVALID, "experiment.variants[2].id", "duplicate")


@pytest.mark.parametrize("variants", [(), ("only",)])
def test_create_with_fewer_than_two_variants(
    ready: ServerProcess, variants: tuple[str, ...]
) -> None:
    _fails(_create(ready, ready.experiment("bad-few", variants)), INVALID, "experiment.variants")


def test_create_fixed_policy_with_zero_weights(ready: ServerProcess) -> None:
    message = ready.experiment("bad-weights", policy=pb.ALLOCATION_POLICY_FIXED)
    for variant in message.variants:
        variant.weight = 0.0
    _fails(_create(ready, message), INVALID, "weight")


def test_create_fixed_policy_with_negative_weight(ready: ServerProcess) -> None:
    message = ready.experiment("bad-weights-neg", policy=pb.ALLOCATION_POLICY_FIXED)
    message.variants[0].weight = -1.0
    message.variants[1].weight = 2.0
    _fails(_create(ready, message), INVALID, "experiment.variants[0].weight")


def test_create_with_unknown_segment_dimension(ready: ServerProcess) -> None:
    message = ready.experiment(
        "bad-dimension",
        segmentation=pb.SegmentationConfig(
            mode=pb.SEGMENTATION_MODE_MANUAL, segment_by=["source", "shoe_size"]
        ),
    )
    _fails(_create(ready, message), INVALID, "experiment.segmentation.segment_by[1]", "shoe_size")


def test_create_with_bad_ids_and_payload(ready: ServerProcess) -> None:
    _fails(_create(ready, ready.experiment("")), INVALID, "experiment.id")
    _fails(_create(ready, ready.experiment("x" * 129)), INVALID, "experiment.id")
    _fails(_create(ready, ready.experiment("has space")), INVALID, "experiment.id")
    message = ready.experiment("bad-payload")
    message.variants[0].payload_json = "{not json"
    _fails(_create(ready, message), INVALID, "experiment.variants[0].payload_json")
    # None of them was created.
    listed = ready.admin.ListExperiments(pb.ListExperimentsRequest(), timeout=RPC_TIMEOUT_S)
    assert not {e.id for e in listed.experiments} & {"", "x" * 129, "has space", "bad-payload"}


# Batches -----------------------------------------------------------------------------------


def test_empty_batches(ready: ServerProcess) -> None:
    _fails(
        lambda: ready.allocator.AllocateBatch(pb.AllocateBatchRequest(), timeout=RPC_TIMEOUT_S),
        INVALID,
        "requests",
    )
    _fails(
        lambda: ready.allocator.RecordConversionBatch(
            pb.RecordConversionBatchRequest(), timeout=RPC_TIMEOUT_S
        ),
        INVALID,
        "requests",
    )


def test_oversized_batches(ready: ServerProcess) -> None:
    allocations = [
        pb.AllocateRequest(experiment_id=EXPERIMENT, user_id=f"big-{i}") for i in range(10_001)
    ]
    _fails(
        lambda: ready.allocator.AllocateBatch(
            pb.AllocateBatchRequest(requests=allocations), timeout=RPC_TIMEOUT_S
        ),
        INVALID,
        "requests",
        "10000",
    )
    # Nobody of the rejected batch was allocated.
    _fails(_convert(ready, experiment_id=EXPERIMENT, user_id="big-0"), grpc.StatusCode.NOT_FOUND)
    conversions = [pb.RecordConversionRequest(assignment_id=f"a{i}") for i in range(10_001)]
    _fails(
        lambda: ready.allocator.RecordConversionBatch(
            pb.RecordConversionBatchRequest(requests=conversions), timeout=RPC_TIMEOUT_S
        ),
        INVALID,
        "requests",
    )


def test_batch_answers_good_items_and_reports_the_bad_one(ready: ServerProcess) -> None:
    requests = [
        pb.AllocateRequest(experiment_id=EXPERIMENT, user_id="batch-0"),
        pb.AllocateRequest(experiment_id=EXPERIMENT, user_id=""),
        pb.AllocateRequest(experiment_id=EXPERIMENT, user_id="batch-2"),
        pb.AllocateRequest(
            experiment_id=EXPERIMENT, user_id="batch-3", context={"utm_source": "y" * 300}
        ),
        pb.AllocateRequest(experiment_id="no-such-experiment", user_id="batch-4"),
        pb.AllocateRequest(experiment_id=EXPERIMENT, user_id="batch-5", timestamp_unix_ms=-5),
        pb.AllocateRequest(experiment_id=EXPERIMENT, user_id="batch-6"),
    ]
    reply = ready.allocator.AllocateBatch(
        pb.AllocateBatchRequest(requests=requests), timeout=RPC_TIMEOUT_S
    )
    kinds = [r.WhichOneof("outcome") for r in reply.results]
    assert kinds == ["allocation", "error", "allocation", "error", "error", "error", "allocation"]
    for i in (0, 2, 6):
        assert reply.results[i].allocation.variant_id in {"A", "B"}
        assert reply.results[i].allocation.assignment_id
    bad_user = reply.results[1].error
    assert (bad_user.code, bad_user.field) == (3, "user_id")
    assert "user_id" in bad_user.message
    bad_context = reply.results[3].error
    assert (bad_context.code, bad_context.field) == (3, "context[utm_source]")
    unknown = reply.results[4].error
    assert (unknown.code, unknown.field) == (grpc.StatusCode.NOT_FOUND.value[0], "")
    bad_time = reply.results[5].error
    assert (bad_time.code, bad_time.field) == (3, "timestamp_unix_ms")
    # The good items are real assignments.
    converted = _convert(ready, assignment_id=reply.results[2].allocation.assignment_id)()
    assert converted.counted  # type: ignore[attr-defined]

    conversions = ready.allocator.RecordConversionBatch(
        pb.RecordConversionBatchRequest(
            requests=[
                pb.RecordConversionRequest(assignment_id=reply.results[0].allocation.assignment_id),
                pb.RecordConversionRequest(
                    assignment_id=reply.results[6].allocation.assignment_id, value=-3.0
                ),
                pb.RecordConversionRequest(
                    assignment_id=reply.results[6].allocation.assignment_id, value=math.nan
                ),
            ]
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert [r.WhichOneof("outcome") for r in conversions.results] == [
        "conversion",
        "error",
        "error",
    ]
    assert conversions.results[0].conversion.counted
    assert [(r.error.code, r.error.field) for r in conversions.results[1:]] == [
        (3, "value"),
        (3, "value"),
    ]


def test_server_still_allocates_after_all_of_it(ready: ServerProcess) -> None:
    assert ready.alive()
    reply = ready.allocator.Allocate(
        pb.AllocateRequest(
            experiment_id=EXPERIMENT,
            user_id="after-everything",
            context={"utm_source": "google", "country_code": "DE"},
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert reply.experiment_id == EXPERIMENT
    assert reply.variant_id in {"A", "B"}
    assert reply.payload_json == f'{{"label": "{reply.variant_id}"}}'
    assert not reply.sticky
    again = ready.allocator.Allocate(
        pb.AllocateRequest(experiment_id=EXPERIMENT, user_id="after-everything"),
        timeout=RPC_TIMEOUT_S,
    )
    assert (again.sticky, again.assignment_id) == (True, reply.assignment_id)
    assert "Traceback" not in ready.stderr()
