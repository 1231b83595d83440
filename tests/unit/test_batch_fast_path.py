"""AllocateBatch from raw bytes (decoding, checks, extraction, decisions and encoding in Rust)
answers exactly like the per-item Python path with the same sampler seed."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import AllocationService
from allocsvc.api import convert
from allocsvc.api.allocator import AllocatorServicer
from allocsvc.context import Extractor
from allocsvc.core import Engine, seed_rng
from allocsvc.errors import InvalidRequest
from allocsvc.learning.features import raw_features

pytestmark = pytest.mark.unit

IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"
IPAD = "Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"
WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"
T0 = 1_700_000_000_000


def _experiments() -> list[pb.Experiment]:
    def experiment(key: str, segment_by: list[str], sticky: bool) -> pb.Experiment:
        return pb.Experiment(
            id=key,
            status=pb.EXPERIMENT_STATUS_RUNNING,
            variants=[
                pb.Variant(id="A", name="Alpha", payload_json='{"c": "red"}'),
                pb.Variant(id="B", name="Beta"),
                pb.Variant(id="C"),
            ],
            segmentation=pb.SegmentationConfig(
                mode=pb.SEGMENTATION_MODE_MANUAL,
                segment_by=segment_by,
                min_samples_per_segment=15,
            ),
            sticky=sticky,
        )

    return [
        experiment("web", ["source", "device", "country"], sticky=True),
        experiment("time", ["channel", "hour", "is_weekend", "day_of_week"], sticky=False),
        experiment("mail", ["list_id", "campaign_id", "funnel_id", "current_stage"], sticky=True),
        pb.Experiment(id="draft", variants=[pb.Variant(id="A"), pb.Variant(id="B")]),
    ]


def _requests() -> list[pb.AllocateRequest]:
    contexts: list[dict[str, str]] = [
        {"utm_source": " Insta:Gram ", "user_agent": IPHONE, "country_code": "us"},
        {"referrer": "https://www.google.co.uk/search?q=1", "user_agent": WINDOWS},
        {"referrer": "https://t.co/abc", "device": " Tablet", "country_code": " DE "},
        {"referrer": "android-app://com.google.android.gm/", "user_agent": IPAD},
        {"referrer": "https://l.facebook.com/", "user_agent": "curl/8.0"},
        {"list_id": "Weekly|News", "campaign_id": "Spring", "funnel_id": "x"},
        {"funnel_id": "Checkout", "current_stage": " Payment "},
        {},
    ]
    channels = ["", "web", "email", "funnel", "push", " PUSH "]
    requests = []
    for i in range(600):
        requests.append(
            pb.AllocateRequest(
                experiment_id=("web", "time", "mail")[i % 3],
                # Some users come back (sticky experiments answer them again).
                user_id=f"user-{i % 450}",
                channel=channels[i % len(channels)],
                context=contexts[i % len(contexts)],
                signals={"pages_viewed": float(i % 7)},
                timestamp_unix_ms=T0 + i * 3_600_000 * 5 if i % 4 else 0,
            )
        )
    bad: list[dict[str, Any]] = [
        {"experiment_id": "web", "user_id": ""},
        {"experiment_id": "nope", "user_id": "u"},
        {"experiment_id": "draft", "user_id": "u"},
        {"experiment_id": "", "user_id": "u"},
        {"experiment_id": "web", "user_id": "u", "timestamp_unix_ms": -1},
        {"experiment_id": "web", "user_id": "u", "channel": "fax"},
        {"experiment_id": "web", "user_id": "u", "context": {"country_code": "USA"}},
        {"experiment_id": "web", "user_id": "u", "context": {"device": "phone"}},
        {"experiment_id": "web", "user_id": "u", "context": {"utm_source": "y" * 300}},
        {"experiment_id": "web", "user_id": "u\x00"},
        {"experiment_id": "web", "user_id": "u", "signals": {"x": float("inf")}},
        {"experiment_id": "web", "user_id": "x" * 257},
    ]
    for n, fields in enumerate(bad):
        requests.insert(37 * n + 5, pb.AllocateRequest(**fields))
    return requests


async def _service() -> AllocationService:
    service = AllocationService(Engine(), MemoryJournal(), Extractor())
    for message in _experiments():
        await service.create_experiment(convert.experiment_from_pb(message))
    return service


def _comparable(result: pb.AllocateResult) -> tuple[object, ...]:
    if result.WhichOneof("outcome") == "error":
        return ("error", result.error.code, result.error.field, result.error.message)
    a = result.allocation
    # Assignment ids differ only in their per-process prefix.
    return (
        a.assignment_id.split("-", 1)[1],
        a.experiment_id,
        a.variant_id,
        a.variant_name,
        a.payload_json,
        a.segment_key,
        a.cascade_level,
        a.propensity,
        a.sticky,
        a.region,
    )


async def test_batch_from_bytes_equals_the_python_path_with_the_same_seed() -> None:
    requests = _requests()
    halves = (requests[:300], requests[300:])
    python, rust = await _service(), await _service()
    python_api, rust_api = AllocatorServicer(python, "eu"), AllocatorServicer(rust, "eu")
    context: Any = None  # only used to abort a whole batch

    seed_rng(11)
    expected: list[pb.AllocateResult] = []
    for half in halves:
        reply = await python_api.AllocateBatch(pb.AllocateBatchRequest(requests=half), context)
        expected.extend(reply.results)
    seed_rng(11)
    got: list[pb.AllocateResult] = []
    for half in halves:
        raw = pb.AllocateBatchRequest(requests=half).SerializeToString()
        got.extend(
            pb.AllocateBatchResponse.FromString(
                await rust_api.AllocateBatchBytes(raw, context)
            ).results
        )

    assert [_comparable(r) for r in got] == [_comparable(r) for r in expected]
    kinds = [_comparable(r)[0] for r in expected]
    assert kinds.count("error") == 12
    assert any(r.allocation.sticky for r in expected)
    assert len({r.allocation.segment_key for r in expected}) > 20
    assert {r.allocation.cascade_level for r in expected} >= {0, 1}
    # Both services hold the same state afterwards: counts, assignments, conversions by user.
    for handle in python.experiment_handles():
        assert sorted(rust.snapshot(handle)) == sorted(python.snapshot(handle))
        assert rust.cascade_counts(handle) == python.cascade_counts(handle)
        assert sorted(rust.segment_keys(handle)) == sorted(python.segment_keys(handle))
    for r in got:
        if r.WhichOneof("outcome") == "allocation":
            kept = rust.assignment(r.allocation.assignment_id)
            assert kept is not None and kept.segment_key == r.allocation.segment_key


async def _features_case() -> tuple[list[pb.AllocateRequest], AllocationService, Any, set[int]]:
    """`_requests()` with a time each and some of the learned signals, prepared as one batch
    whose user agents are then classified: the requests, the service, the batch, its invalid
    positions."""
    signals = ["pages_viewed", "time_seconds", "engagement_score", "drop_risk", "previous_opens"]
    requests = []
    for i, r in enumerate(_requests()):
        r.timestamp_unix_ms = r.timestamp_unix_ms or T0 + i * 60_000  # 0 reads the clock
        r.signals.clear()
        r.signals.update({name: i * 0.5 + k for k, name in enumerate(signals) if (i >> k) & 1})
        requests.append(r)
    service = await _service()
    prepared = service.prepare_batch(pb.AllocateBatchRequest(requests=requests).SerializeToString())
    assert prepared is not None
    catalogue = service._catalogue
    catalogue.learn_devices(
        [(ua, Extractor().device(ua)) for ua in prepared.unknown_user_agents(catalogue)]
    )
    return requests, service, prepared, set(prepared.invalid())


def _python_features(message: pb.AllocateRequest) -> tuple[Any, ...]:
    """What learning keeps of a request by Python's extraction: the user, then RawFeatures."""
    r = convert.allocate_request(message)
    context = Extractor().extract(r.channel, r.context, r.signals, r.timestamp_ms)
    return (r.user_id, *raw_features(context))


async def test_batch_features_equal_what_python_extraction_gives_learning() -> None:
    # Learning's sample of a batch comes from Rust's extraction: it must be raw_features of
    # Python's, channel by channel, signals included (only the channel's own count).
    requests, service, prepared, invalid = await _features_case()
    positions = list(range(0, len(requests), 3)) + list(invalid)
    expected = [_python_features(requests[i]) for i in sorted(set(positions) - invalid)]

    got = prepared.features(service._catalogue, sorted(positions))

    assert got == expected
    assert {row[1] for row in got} == {"web", "email", "funnel", "push"}
    assert len({row[2] for row in got}) == 4  # mobile, desktop, tablet, unknown
    assert {k for row in got for k in range(6, 10) if row[k] is not None} == {6, 7, 8, 9}


async def test_unary_features_equal_what_python_extraction_gives_learning() -> None:
    # A sampled unary call is observed through Rust's extraction too (features_one): the
    # same rows as Python's; None for a request the caller's path answers (a batch's invalid
    # items).
    requests, service, _, invalid = await _features_case()
    assert 0 < len(invalid) < len(requests)
    for i, message in enumerate(requests):
        got = service._catalogue.features_one(message.SerializeToString(), T0)
        assert got == (None if i in invalid else _python_features(message))


async def test_unary_after_batch_sees_the_batch_assignments() -> None:
    service = await _service()
    api = AllocatorServicer(service, "eu")
    raw = pb.AllocateBatchRequest(
        requests=[pb.AllocateRequest(experiment_id="web", user_id=f"b{i}") for i in range(50)]
    ).SerializeToString()
    reply = pb.AllocateBatchResponse.FromString(await api.AllocateBatchBytes(raw, None))  # type: ignore[arg-type]
    again = await api.Allocate(pb.AllocateRequest(experiment_id="web", user_id="b7"), None)  # type: ignore[arg-type]
    assert again.sticky
    assert again.assignment_id == reply.results[7].allocation.assignment_id
    fresh = await api.Allocate(pb.AllocateRequest(experiment_id="web", user_id="new"), None)  # type: ignore[arg-type]
    assert fresh.assignment_id not in {r.allocation.assignment_id for r in reply.results}


async def test_malformed_and_empty_batches_are_invalid() -> None:
    service = await _service()
    with pytest.raises(InvalidRequest) as malformed:
        service.prepare_batch(b"\x0a\x09abc")
    assert malformed.value.field == "requests"
    with pytest.raises(InvalidRequest) as empty:
        service.prepare_batch(b"")
    assert empty.value.field == "requests"


class _Aborted(grpc.aio.AbortError):
    pass


class _Context:
    """What the servicer needs of a grpc.aio context to refuse a call."""

    async def abort(
        self, code: grpc.StatusCode, details: str, trailing_metadata: object = ()
    ) -> None:
        raise _Aborted(code, details)


async def _unary(call: Any, request: Any) -> tuple[object, ...]:
    try:
        reply = await call(request, _Context())
    except _Aborted as refused:
        return ("error", *refused.args)
    if isinstance(reply, bytes):
        reply = pb.AllocateResponse.FromString(reply)
    return _comparable(pb.AllocateResult(allocation=reply))


class _CountingFallbacks(AllocatorServicer):
    """Counts the unary requests the bytes path hands to the Python `Allocate`."""

    fallbacks = 0

    async def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        self.fallbacks += 1
        return await super().Allocate(request, context)


async def test_unary_from_bytes_equals_the_python_path_with_the_same_seed() -> None:
    requests = _requests()
    python, rust = await _service(), await _service()
    python_api, rust_api = AllocatorServicer(python, "eu"), _CountingFallbacks(rust, "eu")

    seed_rng(5)
    expected = [await _unary(python_api.Allocate, r) for r in requests]
    seed_rng(5)
    got = [await _unary(rust_api.AllocateBytes, r.SerializeToString()) for r in requests]

    assert got == expected
    kinds = [e[0] for e in expected]
    assert kinds.count("error") == 12
    # Only the bad requests took the Python path (it words their errors); Rust answered the
    # rest, new users, returning sticky users and unseen user agents alike.
    assert rust_api.fallbacks == 12
    assert any(e[8] is True for e in expected if e[0] != "error")
    for handle in python.experiment_handles():
        assert sorted(rust.snapshot(handle)) == sorted(python.snapshot(handle))
        assert rust.cascade_counts(handle) == python.cascade_counts(handle)


async def test_unary_bytes_that_are_no_request_name_the_request() -> None:
    api = AllocatorServicer(await _service(), "eu")
    refused = await _unary(api.AllocateBytes, b"\xff\xff\xff")
    assert refused[:2] == ("error", grpc.StatusCode.INVALID_ARGUMENT)
    assert str(refused[2]).startswith("request")
