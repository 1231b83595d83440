"""Python client of allocsvc, for backend services and admin tools.

`Client` is synchronous (thread-safe), `AsyncClient` is for asyncio; both keep one gRPC channel
open for their lifetime, so create one per process and share it::

    from allocsvc.client import Client

    with Client("127.0.0.1:50051", timeout=0.5) as client:
        answer = client.allocate("checkout-button", "user-42", context={"utm_source": "google"})
        client.record_conversion(answer.assignment_id, value=12.5, idempotency_key="order-981")

Deadlines: `timeout` (seconds) bounds a whole call, retries included; every method takes
`timeout=` to override the client's default.

Retries (exponential backoff with jitter, only on UNAVAILABLE by default) happen only where
repeating a call cannot change its outcome:

- `RecordConversion(Batch)` and every read-only admin call are always retried: a conversion is
  counted at most once per idempotency key (or per assignment when no key is given), so a retry
  of a conversion whose answer was lost is acknowledged with `counted=False`.
- `Allocate(Batch)` is retried when `RetryPolicy.retry_allocate` is true (the default), because
  experiments are sticky by default (SPEC §3): a repeated Allocate of a user the server already
  answered returns that same assignment (`sticky=True`), so the user never sees two variants.
  For a non-sticky experiment a retry after a lost answer can count one extra allocation; pass
  `retry=False` on such calls (or `RetryPolicy(retry_allocate=False)`) if that matters.
- Admin writes (create, update, pause/resume, segmentation configs, recommendations, tree
  rebuilds, training jobs) are never retried: their outcome depends on the state a lost first
  attempt may already have changed.

Failures raise `ClientError` subclasses named after the status code (`NotFound`,
`InvalidArgument` with the `field` the server named, `FailedPrecondition`, `Unavailable`, ...).

Requests can be built from plain dicts (`experiment_from_dict`, `message_from_dict`): enum values
may be given as short lower-case names ("running", "manual", "thompson"), and a variant's
`payload` as a mapping instead of `payload_json` text.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

# The public client is the second home of the generated messages (after api/): its callers
# build and read them, so they are re-exported as `allocsvc.client.pb`.
from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_TARGET",
    "NO_RETRY",
    "AlreadyExists",
    "AsyncClient",
    "Client",
    "ClientError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryEvent",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
    "as_dict",
    "experiment_from_dict",
    "message_from_dict",
    "pb",
]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
# Reconnect quickly after a server restart; gRPC's own default waits a full second first.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

M = TypeVar("M", bound=Message)


# Errors -----------------------------------------------------------------------------------


class ClientError(Exception):
    """An RPC failed. `code` is the gRPC status, `details` the server's message, `attempts`
    how many times the call was tried."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, attempts: int) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details
        self.attempts = attempts


class InvalidArgument(ClientError):
    """INVALID_ARGUMENT; `field` is the request field the server named (may be empty)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, attempts: int) -> None:
        super().__init__(method, code, details, attempts)
        # The server words it "field: message".
        name, sep, _ = details.partition(": ")
        self.field = name if sep and " " not in name else ""


class NotFound(ClientError):
    """NOT_FOUND: an unknown experiment, assignment or recommendation."""


class AlreadyExists(ClientError):
    """ALREADY_EXISTS: the experiment id is taken."""


class FailedPrecondition(ClientError):
    """FAILED_PRECONDITION: the experiment's state does not allow the call (e.g. not running)."""


class ResourceExhausted(ClientError):
    """RESOURCE_EXHAUSTED: the server is overloaded or a message is too large."""


class Unavailable(ClientError):
    """UNAVAILABLE: the server (or a store it needs) cannot be reached."""


class DeadlineExceeded(ClientError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class Unauthenticated(ClientError):
    """UNAUTHENTICATED: no valid bearer token."""


class PermissionDenied(ClientError):
    """PERMISSION_DENIED: the token may not make this call."""


_ERRORS: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def _error(method: str, exc: grpc.RpcError, attempts: int) -> ClientError:
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    return _ERRORS.get(code, ClientError)(method, code, details, attempts)


# Retries ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """One failed attempt that will be retried after `delay` seconds."""

    method: str
    attempt: int
    code: grpc.StatusCode
    delay: float


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: the n-th retry waits min(max_backoff, initial_backoff *
    multiplier**(n-1)), spread by +-`jitter` (a fraction) so that clients do not retry in step.
    Never waits past the call's deadline."""

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.2
    retryable: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
    retry_allocate: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("initial_backoff, max_backoff: need 0 <= initial <= max")
        if self.multiplier < 1:
            raise ValueError("multiplier: must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter: must lie in [0, 1)")

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (1 = the first retry)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return base * (1 + self.jitter * (2 * rng.random() - 1))


NO_RETRY = RetryPolicy(max_attempts=1)

# Methods whose repetition cannot change their outcome (see the module docstring).
_ALWAYS_SAFE = frozenset(
    {
        "RecordConversion",
        "RecordConversionBatch",
        "GetExperiment",
        "ListExperiments",
        "GetSegmentationConfig",
        "GetEligibility",
        "ListSegments",
        "ListRecommendations",
        "GetTree",
        "GetClusteringStatus",
        "FindSimilarUsers",
        "AnalyzeSegments",
        "CalculateSampleSize",
        "ValidateExperiment",
        "ExportUserData",
        "ListRegions",
        "GetRegion",
    }
)
_SAFE_IF_STICKY = frozenset({"Allocate", "AllocateBatch"})


def _retries(method: str, policy: RetryPolicy, override: bool | None) -> bool:
    if override is not None:
        return override
    return method in _ALWAYS_SAFE or (method in _SAFE_IF_STICKY and policy.retry_allocate)


# Requests from plain data -------------------------------------------------------------------

_ENUM_PREFIXES = {"status": "EXPERIMENT_STATUS_", "policy": "ALLOCATION_POLICY_"}
_MODE_PREFIXES = {"segmentation": "SEGMENTATION_MODE_", "exploration": "EXPLORATION_MODE_"}


def _enum_name(prefix: str, value: object) -> object:
    if isinstance(value, str) and not value.upper().startswith(prefix):
        return prefix + value.strip().upper()
    return value.upper() if isinstance(value, str) else value


def _normalise_experiment(data: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for name in ("status", "policy"):
        if name in out:
            out[name] = _enum_name(_ENUM_PREFIXES[name], out[name])
    for name, prefix in _MODE_PREFIXES.items():
        section = out.get(name)
        if isinstance(section, str):  # `exploration: aggressive`
            section = {"mode": section}
        if isinstance(section, Mapping):
            section = dict(section)
            if "mode" in section:
                section["mode"] = _enum_name(prefix, section["mode"])
            out[name] = section
    variants = out.get("variants")
    if isinstance(variants, Sequence) and not isinstance(variants, str):
        out["variants"] = [_normalise_variant(v) for v in variants]
    return out


def _normalise_variant(data: object) -> object:
    if isinstance(data, str):  # a bare id
        return {"id": data, "name": data}
    if not isinstance(data, Mapping):
        return data
    out = dict(data)
    out.setdefault("name", out.get("id", ""))
    if "payload" in out:
        if "payload_json" in out:
            raise ValueError("variants: give payload or payload_json, not both")
        out["payload_json"] = json.dumps(out.pop("payload"), separators=(",", ":"))
    return out


def message_from_dict(message_type: type[M], data: Mapping[str, Any]) -> M:
    """A request message from plain data (proto field names or their JSON camelCase).

    Unknown fields raise ValueError naming the field.
    """
    try:
        return json_format.ParseDict(dict(data), message_type())
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from None


def experiment_from_dict(data: Mapping[str, Any]) -> pb.Experiment:
    """An Experiment message from plain data, for example loaded from YAML::

        {"id": "checkout-button", "status": "running", "policy": "thompson",
         "variants": [{"id": "green", "payload": {"color": "#0a0"}}, "blue"],
         "segmentation": {"mode": "manual", "segment_by": ["source", "device"],
                          "min_samples_per_segment": 200},
         "exploration": "conservative"}

    `name` defaults to the id (for the experiment and for each variant).
    """
    normalised = _normalise_experiment(data)
    normalised.setdefault("name", normalised.get("id", ""))
    return message_from_dict(pb.Experiment, normalised)


def as_dict(message: Message) -> dict[str, Any]:
    """A response as plain JSON-ready data (proto field names; enums by their names)."""
    data: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return data


def status_value(status: str | int) -> pb.ExperimentStatus:
    """An experiment status from "running", "RUNNING", "EXPERIMENT_STATUS_RUNNING" or a number."""
    try:
        if isinstance(status, int):
            pb.ExperimentStatus.Name(status)  # ValueError for a number that is no status
            return cast(pb.ExperimentStatus, status)
        return cast(
            pb.ExperimentStatus,
            pb.ExperimentStatus.Value(str(_enum_name("EXPERIMENT_STATUS_", status))),
        )
    except ValueError:
        raise ValueError(f"status: unknown status {status!r}") from None


def status_name(status: int) -> str:
    """The short lower-case name of an experiment status ("running")."""
    return pb.ExperimentStatus.Name(status).removeprefix("EXPERIMENT_STATUS_").lower()


def _allocate_request(
    experiment_id: str,
    user_id: str,
    channel: str,
    context: Mapping[str, str] | None,
    signals: Mapping[str, float] | None,
    timestamp_ms: int,
) -> pb.AllocateRequest:
    return pb.AllocateRequest(
        experiment_id=experiment_id,
        user_id=user_id,
        channel=channel,
        context=dict(context or {}),
        signals=dict(signals or {}),
        timestamp_unix_ms=timestamp_ms,
    )


def _as_message(message_type: type[M], item: M | Mapping[str, Any]) -> M:
    return item if isinstance(item, message_type) else message_from_dict(message_type, item)  # type: ignore[arg-type]


def _conversion_request(
    assignment_id: str,
    experiment_id: str,
    user_id: str,
    value: float,
    idempotency_key: str,
) -> pb.RecordConversionRequest:
    return pb.RecordConversionRequest(
        assignment_id=assignment_id,
        experiment_id=experiment_id,
        user_id=user_id,
        value=value,
        idempotency_key=idempotency_key,
    )


def _segmentation(config: pb.SegmentationConfig | Mapping[str, Any]) -> pb.SegmentationConfig:
    if isinstance(config, pb.SegmentationConfig):
        return config
    normalised = _normalise_experiment({"segmentation": config})["segmentation"]
    return message_from_dict(pb.SegmentationConfig, normalised)


def _experiment(experiment: pb.Experiment | Mapping[str, Any]) -> pb.Experiment:
    return experiment if isinstance(experiment, pb.Experiment) else experiment_from_dict(experiment)


def _status_update(experiment_id: str, status: str | int) -> pb.UpdateExperimentRequest:
    request = pb.UpdateExperimentRequest(
        experiment=pb.Experiment(id=experiment_id, status=status_value(status))
    )
    request.update_mask.paths.append("status")
    return request


# Clients ----------------------------------------------------------------------------------


@dataclass
class _Options:
    timeout: float
    retry: RetryPolicy
    metadata: tuple[tuple[str, str], ...]
    on_retry: Callable[[RetryEvent], None] | None
    wait_for_ready: bool
    rng: random.Random = field(default_factory=random.Random)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def delay(self, retry: int) -> float:
        with self.lock:
            return self.retry.delay(retry, self.rng)


def _options(
    timeout: float,
    retry: RetryPolicy | None,
    token: str | None,
    metadata: Iterable[tuple[str, str]],
    on_retry: Callable[[RetryEvent], None] | None,
    wait_for_ready: bool,
) -> _Options:
    if not timeout > 0:
        raise ValueError("timeout: must be > 0 seconds")
    pairs = list(metadata)
    if token is not None:
        pairs.append(("authorization", f"Bearer {token}"))
    return _Options(timeout, retry or RetryPolicy(), tuple(pairs), on_retry, wait_for_ready)


class Client:
    """Synchronous client. Thread-safe; keep one per process (it holds one channel).

    - `target`: "host:port" of a server (or a load balancer in front of replicas).
    - `timeout`: default deadline of a call in seconds, retries included.
    - `retry`: the backoff policy (`NO_RETRY` switches retries off).
    - `token`: sent as `authorization: Bearer <token>` on every call.
    - `credentials`: TLS channel credentials; None means a plaintext channel.
    - `on_retry`: called before each retry's wait (for logging or metrics).
    - `wait_for_ready`: queue calls while the channel (re)connects instead of failing fast.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        wait_for_ready: bool = False,
    ) -> None:
        self._options = _options(timeout, retry, token, metadata, on_retry, wait_for_ready)
        self.target = target
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._allocator = pb_grpc.AllocatorStub(self._channel)  # type: ignore[no-untyped-call]
        self._admin = pb_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        stub: Any,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float | None,
        retry: bool | None,
    ) -> M:
        options = self._options
        deadline = time.monotonic() + (timeout or options.timeout)
        retrying = _retries(method, options.retry, retry)
        rpc = getattr(stub, method)
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = rpc(
                    request,
                    timeout=max(deadline - time.monotonic(), 0.001),
                    metadata=options.metadata,
                    wait_for_ready=options.wait_for_ready,
                )
                assert isinstance(answer, response_type)
                return answer
            except grpc.RpcError as exc:
                delay = _next_delay(options, method, exc, attempt, retrying, deadline)
                if delay is None:
                    raise _error(method, exc, attempt) from None
                time.sleep(delay)

    # Allocator ------------------------------------------------------------------------------

    def allocate(
        self,
        experiment_id: str,
        user_id: str,
        *,
        channel: str = "",
        context: Mapping[str, str] | None = None,
        signals: Mapping[str, float] | None = None,
        timestamp_ms: int = 0,
        timeout: float | None = None,
        retry: bool | None = None,
    ) -> pb.AllocateResponse:
        """Which variant this user sees. `retry` overrides the policy for this call."""
        request = _allocate_request(experiment_id, user_id, channel, context, signals, timestamp_ms)
        return self._call(self._allocator, "Allocate", request, pb.AllocateResponse, timeout, retry)

    def allocate_batch(
        self,
        requests: Iterable[pb.AllocateRequest | Mapping[str, Any]],
        *,
        timeout: float | None = None,
        retry: bool | None = None,
    ) -> list[pb.AllocateResult]:
        """Many allocations in one call; one result (allocation or error) per request, in
        order. Requests may be messages or dicts with AllocateRequest's fields."""
        request = pb.AllocateBatchRequest(
            requests=[_as_message(pb.AllocateRequest, r) for r in requests]
        )
        answer = self._call(
            self._allocator, "AllocateBatch", request, pb.AllocateBatchResponse, timeout, retry
        )
        return list(answer.results)

    def record_conversion(
        self,
        assignment_id: str = "",
        *,
        experiment_id: str = "",
        user_id: str = "",
        value: float = 0.0,
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> pb.RecordConversionResponse:
        """Record a conversion by assignment id (or by experiment_id and user_id). Retried
        safely: a repeat is acknowledged with `counted=False`."""
        request = _conversion_request(assignment_id, experiment_id, user_id, value, idempotency_key)
        return self._call(
            self._allocator,
            "RecordConversion",
            request,
            pb.RecordConversionResponse,
            timeout,
            None,
        )

    def record_conversion_batch(
        self,
        requests: Iterable[pb.RecordConversionRequest | Mapping[str, Any]],
        *,
        timeout: float | None = None,
    ) -> list[pb.RecordConversionResult]:
        """Many conversions in one call; one result per request, in order."""
        request = pb.RecordConversionBatchRequest(
            requests=[_as_message(pb.RecordConversionRequest, r) for r in requests]
        )
        answer = self._call(
            self._allocator,
            "RecordConversionBatch",
            request,
            pb.RecordConversionBatchResponse,
            timeout,
            None,
        )
        return list(answer.results)

    # Admin ----------------------------------------------------------------------------------

    def create_experiment(
        self, experiment: pb.Experiment | Mapping[str, Any], *, timeout: float | None = None
    ) -> pb.Experiment:
        """Create an experiment (a message, or plain data as `experiment_from_dict` takes)."""
        request = pb.CreateExperimentRequest(experiment=_experiment(experiment))
        return self._call(self._admin, "CreateExperiment", request, pb.Experiment, timeout, None)

    def get_experiment(self, experiment_id: str, *, timeout: float | None = None) -> pb.Experiment:
        request = pb.GetExperimentRequest(experiment_id=experiment_id)
        return self._call(self._admin, "GetExperiment", request, pb.Experiment, timeout, None)

    def list_experiments(
        self, status: str | int | None = None, *, timeout: float | None = None
    ) -> list[pb.Experiment]:
        """Every experiment (all pages), optionally only those in `status`."""
        found: list[pb.Experiment] = []
        token = ""
        while True:
            request = pb.ListExperimentsRequest(
                status=pb.EXPERIMENT_STATUS_UNSPECIFIED if status is None else status_value(status),
                page_token=token,
            )
            page = self._call(
                self._admin, "ListExperiments", request, pb.ListExperimentsResponse, timeout, None
            )
            found.extend(page.experiments)
            token = page.next_page_token
            if not token:
                return found

    def update_experiment(
        self,
        experiment: pb.Experiment | Mapping[str, Any],
        paths: Sequence[str],
        *,
        timeout: float | None = None,
    ) -> pb.Experiment:
        """Change the fields named in `paths` (e.g. ["name", "segmentation"])."""
        request = pb.UpdateExperimentRequest(experiment=_experiment(experiment))
        request.update_mask.paths.extend(paths)
        return self._call(self._admin, "UpdateExperiment", request, pb.Experiment, timeout, None)

    def set_status(
        self, experiment_id: str, status: str | int, *, timeout: float | None = None
    ) -> pb.Experiment:
        """Move an experiment to `status` ("running", "paused", "archived")."""
        return self._call(
            self._admin,
            "UpdateExperiment",
            _status_update(experiment_id, status),
            pb.Experiment,
            timeout,
            None,
        )

    def pause_experiment(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.Experiment:
        return self.set_status(experiment_id, "paused", timeout=timeout)

    def resume_experiment(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.Experiment:
        """Set a paused (or draft) experiment running."""
        return self.set_status(experiment_id, "running", timeout=timeout)

    def list_segments(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> list[pb.SegmentCounts]:
        """Every segment of the experiment (all pages) with per-variant counts."""
        found: list[pb.SegmentCounts] = []
        token = ""
        while True:
            request = pb.ListSegmentsRequest(experiment_id=experiment_id, page_token=token)
            page = self._call(
                self._admin, "ListSegments", request, pb.ListSegmentsResponse, timeout, None
            )
            found.extend(page.segments)
            token = page.next_page_token
            if not token:
                return found

    def get_tree(
        self, experiment_id: str, fmt: str = "json", *, timeout: float | None = None
    ) -> pb.GetTreeResponse:
        request = pb.GetTreeRequest(experiment_id=experiment_id, format=fmt)
        return self._call(self._admin, "GetTree", request, pb.GetTreeResponse, timeout, None)

    def rebuild_tree(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.RebuildTreeResponse:
        request = pb.RebuildTreeRequest(experiment_id=experiment_id)
        return self._call(
            self._admin, "RebuildTree", request, pb.RebuildTreeResponse, timeout, None
        )

    def analyze_segments(
        self,
        experiment_id: str,
        *,
        min_allocations: int = 0,
        alpha: float = 0.0,
        timeout: float | None = None,
    ) -> pb.AnalyzeSegmentsResponse:
        request = pb.AnalyzeSegmentsRequest(
            experiment_id=experiment_id, min_allocations=min_allocations, alpha=alpha
        )
        return self._call(
            self._admin, "AnalyzeSegments", request, pb.AnalyzeSegmentsResponse, timeout, None
        )

    def validate_experiment(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.ValidateExperimentResponse:
        request = pb.ValidateExperimentRequest(experiment_id=experiment_id)
        return self._call(
            self._admin,
            "ValidateExperiment",
            request,
            pb.ValidateExperimentResponse,
            timeout,
            None,
        )

    def calculate_sample_size(
        self, *, timeout: float | None = None, **fields: Any
    ) -> pb.CalculateSampleSizeResponse:
        """Power analysis; `fields` are CalculateSampleSizeRequest's (baseline_rate, ...)."""
        request = message_from_dict(pb.CalculateSampleSizeRequest, fields)
        return self._call(
            self._admin,
            "CalculateSampleSize",
            request,
            pb.CalculateSampleSizeResponse,
            timeout,
            None,
        )

    def list_recommendations(
        self, experiment_id: str = "", status: str = "", *, timeout: float | None = None
    ) -> list[pb.Recommendation]:
        request = pb.ListRecommendationsRequest(experiment_id=experiment_id, status=status)
        answer = self._call(
            self._admin,
            "ListRecommendations",
            request,
            pb.ListRecommendationsResponse,
            timeout,
            None,
        )
        return list(answer.recommendations)

    def get_segmentation_config(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.SegmentationConfig:
        request = pb.GetSegmentationConfigRequest(experiment_id=experiment_id)
        return self._call(
            self._admin, "GetSegmentationConfig", request, pb.SegmentationConfig, timeout, None
        )

    def update_segmentation_config(
        self,
        experiment_id: str,
        config: pb.SegmentationConfig | Mapping[str, Any],
        *,
        timeout: float | None = None,
    ) -> pb.SegmentationConfig:
        """Replace the experiment's segmentation config whole (a message, or plain data such
        as `{"mode": "manual", "segment_by": ["source"]}`); returns it as stored, with the
        server's defaults filled in."""
        request = pb.UpdateSegmentationConfigRequest(
            experiment_id=experiment_id, config=_segmentation(config)
        )
        return self._call(
            self._admin, "UpdateSegmentationConfig", request, pb.SegmentationConfig, timeout, None
        )

    def get_eligibility(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.GetEligibilityResponse:
        """Whether the experiment's traffic qualifies it for segmentation, and the advice."""
        request = pb.GetEligibilityRequest(experiment_id=experiment_id)
        return self._call(
            self._admin, "GetEligibility", request, pb.GetEligibilityResponse, timeout, None
        )

    def accept_recommendation(
        self, recommendation_id: str, *, timeout: float | None = None
    ) -> pb.Recommendation:
        """Accept a pending recommendation (its segmentation is switched on)."""
        request = pb.AcceptRecommendationRequest(recommendation_id=recommendation_id)
        return self._call(
            self._admin, "AcceptRecommendation", request, pb.Recommendation, timeout, None
        )

    def dismiss_recommendation(
        self, recommendation_id: str, *, timeout: float | None = None
    ) -> pb.Recommendation:
        request = pb.DismissRecommendationRequest(recommendation_id=recommendation_id)
        return self._call(
            self._admin, "DismissRecommendation", request, pb.Recommendation, timeout, None
        )

    def train_clusters(
        self, *, use_embeddings: bool = False, timeout: float | None = None
    ) -> pb.LearningJob:
        """Start training a clustering model (on the newest embedding model's embeddings with
        `use_embeddings`); returns the job at once (follow it with
        `get_clustering_status(job.job_id)`)."""
        request = pb.TrainClustersRequest(use_embeddings=use_embeddings)
        return self._call(self._admin, "TrainClusters", request, pb.LearningJob, timeout, None)

    def get_clustering_status(
        self, job_id: str = "", *, timeout: float | None = None
    ) -> pb.ClusteringStatus:
        """The deployed clustering model, drift, and the latest job (or the job `job_id`)."""
        request = pb.GetClusteringStatusRequest(job_id=job_id)
        return self._call(
            self._admin, "GetClusteringStatus", request, pb.ClusteringStatus, timeout, None
        )

    def train_embeddings(
        self,
        *,
        epochs: int = 0,
        loss: str = "",
        labels: str = "",
        fine_tune: bool = False,
        timeout: float | None = None,
    ) -> pb.LearningJob:
        """Start training a user-embedding model; returns the job at once. 0 and "" mean the
        server's embeddings settings."""
        request = pb.TrainEmbeddingsRequest(
            epochs=epochs, loss=loss, labels=labels, fine_tune=fine_tune
        )
        return self._call(self._admin, "TrainEmbeddings", request, pb.LearningJob, timeout, None)

    def find_similar_users(
        self, user_id: str, k: int = 0, *, timeout: float | None = None
    ) -> pb.FindSimilarUsersResponse:
        """The `k` users most similar to `user_id` (0 means 10), best first."""
        request = pb.FindSimilarUsersRequest(user_id=user_id, k=k)
        return self._call(
            self._admin, "FindSimilarUsers", request, pb.FindSimilarUsersResponse, timeout, None
        )

    def export_user_data(
        self, user_id: str, region: str = "", *, timeout: float | None = None
    ) -> pb.ExportUserDataResponse:
        """Everything held on a user (in `region`, or in every region); `json` holds the data."""
        request = pb.ExportUserDataRequest(user_id=user_id, region=region)
        return self._call(
            self._admin, "ExportUserData", request, pb.ExportUserDataResponse, timeout, None
        )

    def delete_user_data(
        self, user_id: str, region: str = "", reason: str = "", *, timeout: float | None = None
    ) -> pb.DeleteUserDataResponse:
        """Erase a user's data (in `region`, or in every region); audited under a receipt id."""
        request = pb.DeleteUserDataRequest(user_id=user_id, region=region, reason=reason)
        return self._call(
            self._admin, "DeleteUserData", request, pb.DeleteUserDataResponse, timeout, None
        )

    def list_regions(self, *, timeout: float | None = None) -> pb.ListRegionsResponse:
        request = pb.ListRegionsRequest()
        return self._call(
            self._admin, "ListRegions", request, pb.ListRegionsResponse, timeout, None
        )

    def get_region(self, code: str, *, timeout: float | None = None) -> pb.Region:
        request = pb.GetRegionRequest(code=code)
        return self._call(self._admin, "GetRegion", request, pb.Region, timeout, None)

    def upsert_region(
        self, region: pb.Region | Mapping[str, Any], *, timeout: float | None = None
    ) -> pb.Region:
        """Add or change a region (a message, or plain data with the Region fields)."""
        request = pb.UpsertRegionRequest(region=_as_message(pb.Region, region))
        return self._call(self._admin, "UpsertRegion", request, pb.Region, timeout, None)


class AsyncClient:
    """The asyncio client: the same methods as `Client`, as coroutines. Create it inside the
    event loop that uses it; `await client.close()` (or `async with`) at the end."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        wait_for_ready: bool = False,
    ) -> None:
        self._options = _options(timeout, retry, token, metadata, on_retry, wait_for_ready)
        self.target = target
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._allocator = pb_grpc.AllocatorStub(self._channel)  # type: ignore[no-untyped-call]
        self._admin = pb_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self,
        stub: Any,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float | None,
        retry: bool | None,
    ) -> M:
        options = self._options
        deadline = time.monotonic() + (timeout or options.timeout)
        retrying = _retries(method, options.retry, retry)
        rpc = getattr(stub, method)
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = await rpc(
                    request,
                    timeout=max(deadline - time.monotonic(), 0.001),
                    metadata=options.metadata,
                    wait_for_ready=options.wait_for_ready,
                )
                assert isinstance(answer, response_type)
                return answer
            except grpc.RpcError as exc:
                delay = _next_delay(options, method, exc, attempt, retrying, deadline)
                if delay is None:
                    raise _error(method, exc, attempt) from None
                await asyncio.sleep(delay)

    async def allocate(
        self,
        experiment_id: str,
        user_id: str,
        *,
        channel: str = "",
        context: Mapping[str, str] | None = None,
        signals: Mapping[str, float] | None = None,
        timestamp_ms: int = 0,
        timeout: float | None = None,
        retry: bool | None = None,
    ) -> pb.AllocateResponse:
        """Which variant this user sees. `retry` overrides the policy for this call."""
        request = _allocate_request(experiment_id, user_id, channel, context, signals, timestamp_ms)
        return await self._call(
            self._allocator, "Allocate", request, pb.AllocateResponse, timeout, retry
        )

    async def allocate_batch(
        self,
        requests: Iterable[pb.AllocateRequest | Mapping[str, Any]],
        *,
        timeout: float | None = None,
        retry: bool | None = None,
    ) -> list[pb.AllocateResult]:
        request = pb.AllocateBatchRequest(
            requests=[_as_message(pb.AllocateRequest, r) for r in requests]
        )
        answer = await self._call(
            self._allocator, "AllocateBatch", request, pb.AllocateBatchResponse, timeout, retry
        )
        return list(answer.results)

    async def record_conversion(
        self,
        assignment_id: str = "",
        *,
        experiment_id: str = "",
        user_id: str = "",
        value: float = 0.0,
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> pb.RecordConversionResponse:
        request = _conversion_request(assignment_id, experiment_id, user_id, value, idempotency_key)
        return await self._call(
            self._allocator,
            "RecordConversion",
            request,
            pb.RecordConversionResponse,
            timeout,
            None,
        )

    async def record_conversion_batch(
        self,
        requests: Iterable[pb.RecordConversionRequest | Mapping[str, Any]],
        *,
        timeout: float | None = None,
    ) -> list[pb.RecordConversionResult]:
        request = pb.RecordConversionBatchRequest(
            requests=[_as_message(pb.RecordConversionRequest, r) for r in requests]
        )
        answer = await self._call(
            self._allocator,
            "RecordConversionBatch",
            request,
            pb.RecordConversionBatchResponse,
            timeout,
            None,
        )
        return list(answer.results)

    async def create_experiment(
        self, experiment: pb.Experiment | Mapping[str, Any], *, timeout: float | None = None
    ) -> pb.Experiment:
        request = pb.CreateExperimentRequest(experiment=_experiment(experiment))
        return await self._call(
            self._admin, "CreateExperiment", request, pb.Experiment, timeout, None
        )

    async def get_experiment(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.Experiment:
        request = pb.GetExperimentRequest(experiment_id=experiment_id)
        return await self._call(self._admin, "GetExperiment", request, pb.Experiment, timeout, None)

    async def list_experiments(
        self, status: str | int | None = None, *, timeout: float | None = None
    ) -> list[pb.Experiment]:
        found: list[pb.Experiment] = []
        token = ""
        while True:
            request = pb.ListExperimentsRequest(
                status=pb.EXPERIMENT_STATUS_UNSPECIFIED if status is None else status_value(status),
                page_token=token,
            )
            page = await self._call(
                self._admin, "ListExperiments", request, pb.ListExperimentsResponse, timeout, None
            )
            found.extend(page.experiments)
            token = page.next_page_token
            if not token:
                return found

    async def set_status(
        self, experiment_id: str, status: str | int, *, timeout: float | None = None
    ) -> pb.Experiment:
        return await self._call(
            self._admin,
            "UpdateExperiment",
            _status_update(experiment_id, status),
            pb.Experiment,
            timeout,
            None,
        )

    async def pause_experiment(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.Experiment:
        return await self.set_status(experiment_id, "paused", timeout=timeout)

    async def resume_experiment(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.Experiment:
        return await self.set_status(experiment_id, "running", timeout=timeout)

    async def update_experiment(
        self,
        experiment: pb.Experiment | Mapping[str, Any],
        paths: Sequence[str],
        *,
        timeout: float | None = None,
    ) -> pb.Experiment:
        request = pb.UpdateExperimentRequest(experiment=_experiment(experiment))
        request.update_mask.paths.extend(paths)
        return await self._call(
            self._admin, "UpdateExperiment", request, pb.Experiment, timeout, None
        )

    async def list_segments(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> list[pb.SegmentCounts]:
        found: list[pb.SegmentCounts] = []
        token = ""
        while True:
            request = pb.ListSegmentsRequest(experiment_id=experiment_id, page_token=token)
            page = await self._call(
                self._admin, "ListSegments", request, pb.ListSegmentsResponse, timeout, None
            )
            found.extend(page.segments)
            token = page.next_page_token
            if not token:
                return found

    async def get_tree(
        self, experiment_id: str, fmt: str = "json", *, timeout: float | None = None
    ) -> pb.GetTreeResponse:
        request = pb.GetTreeRequest(experiment_id=experiment_id, format=fmt)
        return await self._call(self._admin, "GetTree", request, pb.GetTreeResponse, timeout, None)

    async def rebuild_tree(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.RebuildTreeResponse:
        request = pb.RebuildTreeRequest(experiment_id=experiment_id)
        return await self._call(
            self._admin, "RebuildTree", request, pb.RebuildTreeResponse, timeout, None
        )

    async def analyze_segments(
        self,
        experiment_id: str,
        *,
        min_allocations: int = 0,
        alpha: float = 0.0,
        timeout: float | None = None,
    ) -> pb.AnalyzeSegmentsResponse:
        request = pb.AnalyzeSegmentsRequest(
            experiment_id=experiment_id, min_allocations=min_allocations, alpha=alpha
        )
        return await self._call(
            self._admin, "AnalyzeSegments", request, pb.AnalyzeSegmentsResponse, timeout, None
        )

    async def validate_experiment(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.ValidateExperimentResponse:
        request = pb.ValidateExperimentRequest(experiment_id=experiment_id)
        return await self._call(
            self._admin,
            "ValidateExperiment",
            request,
            pb.ValidateExperimentResponse,
            timeout,
            None,
        )

    async def calculate_sample_size(
        self, *, timeout: float | None = None, **fields: Any
    ) -> pb.CalculateSampleSizeResponse:
        request = message_from_dict(pb.CalculateSampleSizeRequest, fields)
        return await self._call(
            self._admin,
            "CalculateSampleSize",
            request,
            pb.CalculateSampleSizeResponse,
            timeout,
            None,
        )

    async def list_recommendations(
        self, experiment_id: str = "", status: str = "", *, timeout: float | None = None
    ) -> list[pb.Recommendation]:
        request = pb.ListRecommendationsRequest(experiment_id=experiment_id, status=status)
        answer = await self._call(
            self._admin,
            "ListRecommendations",
            request,
            pb.ListRecommendationsResponse,
            timeout,
            None,
        )
        return list(answer.recommendations)

    async def get_segmentation_config(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.SegmentationConfig:
        request = pb.GetSegmentationConfigRequest(experiment_id=experiment_id)
        return await self._call(
            self._admin, "GetSegmentationConfig", request, pb.SegmentationConfig, timeout, None
        )

    async def update_segmentation_config(
        self,
        experiment_id: str,
        config: pb.SegmentationConfig | Mapping[str, Any],
        *,
        timeout: float | None = None,
    ) -> pb.SegmentationConfig:
        """Replace the experiment's segmentation config whole (a message, or plain data such
        as `{"mode": "manual", "segment_by": ["source"]}`); returns it as stored, with the
        server's defaults filled in."""
        request = pb.UpdateSegmentationConfigRequest(
            experiment_id=experiment_id, config=_segmentation(config)
        )
        return await self._call(
            self._admin, "UpdateSegmentationConfig", request, pb.SegmentationConfig, timeout, None
        )

    async def get_eligibility(
        self, experiment_id: str, *, timeout: float | None = None
    ) -> pb.GetEligibilityResponse:
        """Whether the experiment's traffic qualifies it for segmentation, and the advice."""
        request = pb.GetEligibilityRequest(experiment_id=experiment_id)
        return await self._call(
            self._admin, "GetEligibility", request, pb.GetEligibilityResponse, timeout, None
        )

    async def accept_recommendation(
        self, recommendation_id: str, *, timeout: float | None = None
    ) -> pb.Recommendation:
        """Accept a pending recommendation (its segmentation is switched on)."""
        request = pb.AcceptRecommendationRequest(recommendation_id=recommendation_id)
        return await self._call(
            self._admin, "AcceptRecommendation", request, pb.Recommendation, timeout, None
        )

    async def dismiss_recommendation(
        self, recommendation_id: str, *, timeout: float | None = None
    ) -> pb.Recommendation:
        request = pb.DismissRecommendationRequest(recommendation_id=recommendation_id)
        return await self._call(
            self._admin, "DismissRecommendation", request, pb.Recommendation, timeout, None
        )

    async def train_clusters(
        self, *, use_embeddings: bool = False, timeout: float | None = None
    ) -> pb.LearningJob:
        """Start training a clustering model (on the newest embedding model's embeddings with
        `use_embeddings`); returns the job at once (follow it with
        `get_clustering_status(job.job_id)`)."""
        request = pb.TrainClustersRequest(use_embeddings=use_embeddings)
        return await self._call(
            self._admin, "TrainClusters", request, pb.LearningJob, timeout, None
        )

    async def get_clustering_status(
        self, job_id: str = "", *, timeout: float | None = None
    ) -> pb.ClusteringStatus:
        """The deployed clustering model, drift, and the latest job (or the job `job_id`)."""
        request = pb.GetClusteringStatusRequest(job_id=job_id)
        return await self._call(
            self._admin, "GetClusteringStatus", request, pb.ClusteringStatus, timeout, None
        )

    async def train_embeddings(
        self,
        *,
        epochs: int = 0,
        loss: str = "",
        labels: str = "",
        fine_tune: bool = False,
        timeout: float | None = None,
    ) -> pb.LearningJob:
        """Start training a user-embedding model; returns the job at once. 0 and "" mean the
        server's embeddings settings."""
        request = pb.TrainEmbeddingsRequest(
            epochs=epochs, loss=loss, labels=labels, fine_tune=fine_tune
        )
        return await self._call(
            self._admin, "TrainEmbeddings", request, pb.LearningJob, timeout, None
        )

    async def find_similar_users(
        self, user_id: str, k: int = 0, *, timeout: float | None = None
    ) -> pb.FindSimilarUsersResponse:
        """The `k` users most similar to `user_id` (0 means 10), best first."""
        request = pb.FindSimilarUsersRequest(user_id=user_id, k=k)
        return await self._call(
            self._admin, "FindSimilarUsers", request, pb.FindSimilarUsersResponse, timeout, None
        )

    async def export_user_data(
        self, user_id: str, region: str = "", *, timeout: float | None = None
    ) -> pb.ExportUserDataResponse:
        """Everything held on a user (in `region`, or in every region); `json` holds the data."""
        request = pb.ExportUserDataRequest(user_id=user_id, region=region)
        return await self._call(
            self._admin, "ExportUserData", request, pb.ExportUserDataResponse, timeout, None
        )

    async def delete_user_data(
        self, user_id: str, region: str = "", reason: str = "", *, timeout: float | None = None
    ) -> pb.DeleteUserDataResponse:
        """Erase a user's data (in `region`, or in every region); audited under a receipt id."""
        request = pb.DeleteUserDataRequest(user_id=user_id, region=region, reason=reason)
        return await self._call(
            self._admin, "DeleteUserData", request, pb.DeleteUserDataResponse, timeout, None
        )

    async def list_regions(self, *, timeout: float | None = None) -> pb.ListRegionsResponse:
        request = pb.ListRegionsRequest()
        return await self._call(
            self._admin, "ListRegions", request, pb.ListRegionsResponse, timeout, None
        )

    async def get_region(self, code: str, *, timeout: float | None = None) -> pb.Region:
        request = pb.GetRegionRequest(code=code)
        return await self._call(self._admin, "GetRegion", request, pb.Region, timeout, None)

    async def upsert_region(
        self, region: pb.Region | Mapping[str, Any], *, timeout: float | None = None
    ) -> pb.Region:
        """Add or change a region (a message, or plain data with the Region fields)."""
        request = pb.UpsertRegionRequest(region=_as_message(pb.Region, region))
        return await self._call(self._admin, "UpsertRegion", request, pb.Region, timeout, None)


def _next_delay(
    options: _Options,
    method: str,
    exc: grpc.RpcError,
    attempt: int,
    retrying: bool,
    deadline: float,
) -> float | None:
    """Seconds to wait before the next attempt, or None to give up with this error."""
    code = exc.code()
    if not retrying or code not in options.retry.retryable:
        return None
    if attempt >= options.retry.max_attempts:
        return None
    delay = options.delay(attempt)
    if time.monotonic() + delay >= deadline:
        return None
    if options.on_retry is not None:
        options.on_retry(RetryEvent(method, attempt, code, delay))
    return delay
