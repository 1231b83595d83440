"""The telemetry wrapper behaves the same whether it wraps handlers at registration (no
interceptor per call, the server's default without auth; with registered methods or, as the
server registers them, generic handlers only) or as a server interceptor, and whether the
server was started by `start_serving` (calls begin UNNAMED, as allocsvc's server starts) or
by its own `start`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from allocsvc import logs
from allocsvc.api.errors import maps_errors, tries_first
from allocsvc.api.registration import GenericOnly
from allocsvc.api.telemetry import (
    LATENCY_BUCKETS,
    RpcMetrics,
    TelemetryInterceptor,
    _InstrumentedGeneric,
    start_serving,
)
from allocsvc.errors import InvalidRequest, ResourceExhausted
from allocsvc.logs import REQUEST_ID_KEY

pytestmark = pytest.mark.unit

SERVICE = "test.Gated"
METHOD = f"/{SERVICE}/Echo"
# The deadline of the call `_Busy` holds the loop past. Long enough for the call to reach the
# handler on a loaded machine: a call still unsent at its deadline never reaches the server,
# whose wrapper then counts nothing.
BUSY_DEADLINE_S = 0.5


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _name(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """The request id this call's log lines carry, after other calls ran meanwhile."""
    await asyncio.sleep(0.01)
    return (logs.current_request_id() or "").encode()


async def _spawn(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """The request id of this call and of a task it starts."""
    child = await asyncio.create_task(_current())
    return f"{logs.current_request_id()}|{child}".encode()


async def _current() -> str | None:
    return logs.current_request_id()


async def _fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    raise ValueError("boom")


class _Refusing:
    @maps_errors
    async def refuse(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        raise InvalidRequest("user_id", "must not be empty")


class _TwoPart:
    """A `tries_first` method: its first try answers requests starting with b"f", refuses
    b"bad" (a domain error), fails on b"bug" and declines the rest, which `_slowly` answers."""

    def __init__(self) -> None:
        self.slow_calls = 0

    def _first(self, request: bytes) -> bytes | None:
        if request == b"peek":
            return repr(logs.request_id.get()).encode()  # what the call's context holds
        if request == b"bad":
            raise InvalidRequest("user_id", "must not be empty")
        if request == b"bug":
            raise KeyError("boom")
        return b"first:" + request if request.startswith(b"f") else None

    @maps_errors
    async def _slowly(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        self.slow_calls += 1
        await asyncio.sleep(0)
        return b"slow:" + request

    answer = tries_first("_first", _slowly)


TWO_PART = _TwoPart()


class _Busy:
    @maps_errors
    async def refuse(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        # Work that holds the event loop (as Rust's does) while the client's deadline
        # (BUSY_DEADLINE_S) passes; then a refusal, which can no longer be sent.
        time.sleep(BUSY_DEADLINE_S + 0.25)
        raise ResourceExhausted("write-behind buffer full")


def _handlers() -> dict[str, Any]:
    return {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Name": grpc.unary_unary_rpc_method_handler(_name),
        "Spawn": grpc.unary_unary_rpc_method_handler(_spawn),
        "Refuse": grpc.unary_unary_rpc_method_handler(_Refusing().refuse),
        "Busy": grpc.unary_unary_rpc_method_handler(_Busy().refuse),
        "TwoPart": grpc.unary_unary_rpc_method_handler(TWO_PART.answer),
    }


def _with_registration(telemetry: TelemetryInterceptor) -> grpc.aio.Server:
    server = grpc.aio.server()
    _with_registration_on(server, telemetry)
    return server


def _with_registration_on(server: grpc.aio.Server, telemetry: TelemetryInterceptor) -> None:
    registering = telemetry.registering(server)
    registering.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, _handlers()),)
    )
    registering.add_registered_method_handlers(SERVICE, _handlers())  # type: ignore[attr-defined]


def _generic_only(telemetry: TelemetryInterceptor) -> grpc.aio.Server:
    server = GenericOnly(grpc.aio.server())
    _with_registration_on(server, telemetry)
    return server


def _with_interceptor(telemetry: TelemetryInterceptor) -> grpc.aio.Server:
    server = grpc.aio.server(interceptors=[telemetry])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, _handlers()),))
    return server


Build = Callable[[TelemetryInterceptor], grpc.aio.Server]


@pytest.fixture(
    params=[
        (build, unnamed)
        for build in (_with_registration, _generic_only, _with_interceptor)
        for unnamed in (True, False)
    ],
    ids=[
        f"{build}-{start}"
        for build in ("registration", "generic-only", "interceptor")
        for start in ("start_serving", "start")
    ],
)
async def served(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[TelemetryInterceptor, RpcMetrics, grpc.aio.Channel]]:
    metrics = RpcMetrics()
    telemetry = TelemetryInterceptor(metrics, gated=[SERVICE])
    build: Build = request.param[0]
    server = build(telemetry)
    port = server.add_insecure_port("127.0.0.1:0")
    if request.param[1]:
        await start_serving(server)
    else:
        await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield telemetry, metrics, channel
    finally:
        await channel.close(None)
        await server.stop(None)


def _ids(metadata: Any) -> list[str]:
    return [v for k, v in tuple(metadata or ()) if k == REQUEST_ID_KEY]


async def _counted(metrics: RpcMetrics, method: str, code: str, expected: float) -> float:
    """The count, given up to 2 s to reach `expected`: a call's status reaches the client
    before the wrapper around the handler has counted it."""
    for _ in range(200):
        if _count(metrics, method, code) >= expected:
            break
        await asyncio.sleep(0.01)
    return _count(metrics, method, code)


def _count(metrics: RpcMetrics, method: str, code: str) -> float:
    for family in metrics.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == {
                "method": method,
                "code": code,
            }:
                return sample.value
    return 0.0


async def test_gate_request_ids_and_metrics(
    served: tuple[TelemetryInterceptor, RpcMetrics, grpc.aio.Channel],
) -> None:
    telemetry, metrics, channel = served
    echo = channel.unary_unary(METHOD, None, None)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await echo(b"early", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await _counted(metrics, "Echo", "UNAVAILABLE", 1) == 1

    assert len(_ids(refused.value.trailing_metadata())) == 1  # a refusal names its request

    telemetry.ready = True
    call = echo(b"hello", metadata=((REQUEST_ID_KEY, "req-7"),), timeout=10)
    assert await call == b"hello"
    assert _ids(await call.trailing_metadata()) == ["req-7"]

    # A successful call the client did not tag (or tagged unusably) carries no trailer.
    for _ in range(3):
        call = echo(b"x", metadata=((REQUEST_ID_KEY, "not usable!"),), timeout=10)
        assert await call == b"x"
        assert _ids(await call.trailing_metadata()) == []
    assert await _counted(metrics, "Echo", "OK", 4) == 4

    # A failed call carries its request id: a fresh one each time, or the client's.
    fresh = []
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await channel.unary_unary(f"/{SERVICE}/Refuse", None, None)(b"", timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ids = _ids(bad.value.trailing_metadata())
        assert len(ids) == 1
        fresh.append(ids[0])
    assert len(set(fresh)) == 3
    with pytest.raises(grpc.aio.AioRpcError) as tagged:
        await channel.unary_unary(f"/{SERVICE}/Refuse", None, None)(
            b"", metadata=((REQUEST_ID_KEY, "req-8"),), timeout=10
        )
    assert _ids(tagged.value.trailing_metadata()) == ["req-8"]

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await channel.unary_unary(f"/{SERVICE}/Fail", None, None)(b"", timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNKNOWN
    assert len(_ids(failed.value.trailing_metadata())) == 1
    assert await _counted(metrics, "Fail", "UNKNOWN", 1) == 1


async def test_concurrent_calls_each_carry_their_own_request_id(
    served: tuple[TelemetryInterceptor, RpcMetrics, grpc.aio.Channel],
) -> None:
    telemetry, _, channel = served
    telemetry.ready = True
    name = channel.unary_unary(f"/{SERVICE}/Name", None, None)
    tagged = [name(b"", metadata=((REQUEST_ID_KEY, f"req-{i}"),), timeout=10) for i in range(20)]
    untagged = [name(b"", timeout=10) for _ in range(20)]
    answers = await asyncio.gather(*tagged, *untagged)
    # Named where the handler was found (the call's own task), seen by its handler after
    # the others had run: the client's id, or a fresh one of its own.
    assert [a.decode() for a in answers[:20]] == [f"req-{i}" for i in range(20)]
    assert [_ids(await c.trailing_metadata()) for c in tagged] == [[f"req-{i}"] for i in range(20)]
    fresh = [a.decode() for a in answers[20:]]
    assert all(fresh) and len(set(fresh)) == 20
    assert not {f"req-{i}" for i in range(20)} & set(fresh)
    assert [_ids(await c.trailing_metadata()) for c in untagged] == [[]] * 20
    assert logs.request_id.get() is None, "nothing set in the caller's context"


async def test_a_call_nothing_asks_about_is_not_named_and_one_that_awaits_is() -> None:
    """Started by `start_serving`, as allocsvc's server is: a call the first try answers sets
    no id in its context (the client's only, when it sent one); a handler that awaits has its
    id set, so that the tasks it starts carry it."""
    telemetry = TelemetryInterceptor(None, gated=[SERVICE])
    telemetry.ready = True
    server = _generic_only(telemetry)
    port = server.add_insecure_port("127.0.0.1:0")
    await start_serving(server)
    assert logs.request_id.get() is None, "nothing set in the caller's context"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            two_part = channel.unary_unary(f"/{SERVICE}/TwoPart", None, None)
            assert await two_part(b"peek", timeout=10) == repr(logs.UNNAMED).encode()
            tagged = await two_part(b"peek", metadata=((REQUEST_ID_KEY, "req-5"),), timeout=10)
            assert tagged == b"'req-5'"
            spawn = channel.unary_unary(f"/{SERVICE}/Spawn", None, None)
            answers = [(await spawn(b"", timeout=10)).decode().split("|") for _ in range(3)]
    finally:
        await server.stop(None)
    assert all(own and own == child for own, child in answers)
    assert len({own for own, _ in answers}) == 3


async def test_an_unnamed_call_draws_one_number_and_leaves_its_context_unnamed() -> None:
    """A line logged where the calls start (grpc's serving task) gets a number that no call
    started after it shares; each call keeps the number it drew."""

    async def call() -> tuple[str | None, str | None]:
        first = logs.current_request_id()
        await asyncio.sleep(0)
        return first, logs.current_request_id()

    async def serving() -> None:
        logs.request_id.set(logs.UNNAMED)
        own = logs.current_request_id()
        assert own is not None and own == logs.current_request_id()
        assert logs.request_id.get() == logs.UNNAMED
        calls = await asyncio.gather(*(asyncio.create_task(call()) for _ in range(5)))
        assert all(first is not None and first == again for first, again in calls)
        drawn = {first for first, _ in calls}
        assert len(drawn) == 5 and own not in drawn
        # Outside any task (a thread given the context): drawn there, once.
        in_thread = await asyncio.to_thread(lambda: (call_id(), call_id()))
        assert in_thread[0] is not None and in_thread[0] == in_thread[1]
        assert in_thread[0] not in drawn | {own}

    def call_id() -> str | None:
        return logs.current_request_id()

    await asyncio.create_task(serving())
    assert logs.request_id.get() is None


async def test_a_failure_is_logged_and_a_call_gone_under_its_handler_is_not_unknown(
    served: tuple[TelemetryInterceptor, RpcMetrics, grpc.aio.Channel],
    caplog: pytest.LogCaptureFixture,
) -> None:
    telemetry, metrics, channel = served
    telemetry.ready = True
    with caplog.at_level(logging.ERROR, logger="allocsvc.api.telemetry"):
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(f"/{SERVICE}/Fail", None, None)(b"", timeout=10)
        assert await _counted(metrics, "Fail", "UNKNOWN", 1) == 1
    # An UNKNOWN leaves its traceback in the log.
    (failure,) = [r for r in caplog.records if r.getMessage() == "rpc failed"]
    assert failure.exc_info is not None and "boom" in str(failure.exc_info[1])
    caplog.clear()
    # The deadline passes while the handler holds the loop: its refusal cannot be sent
    # (grpc raises on the attempt). That call is counted as what the client saw, not as a
    # handler failure (UNKNOWN, as it was), and logs no traceback.
    with caplog.at_level(logging.ERROR, logger="allocsvc.api.telemetry"):
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await channel.unary_unary(f"/{SERVICE}/Busy", None, None)(b"", timeout=BUSY_DEADLINE_S)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await _counted(metrics, "Busy", "DEADLINE_EXCEEDED", 1) == 1
    assert _count(metrics, "Busy", "UNKNOWN") == 0
    assert _count(metrics, "Busy", "RESOURCE_EXHAUSTED") == 0
    assert not [r for r in caplog.records if r.getMessage() == "rpc failed"]


async def _two_part_calls(channel: grpc.aio.Channel, slow_calls: int) -> None:
    """What a `tries_first` method answers, with or without the telemetry wrapper."""
    two_part = channel.unary_unary(f"/{SERVICE}/TwoPart", None, None)
    assert await two_part(b"fast", timeout=10) == b"first:fast"
    assert TWO_PART.slow_calls == slow_calls  # the first try answered alone
    assert await two_part(b"other", timeout=10) == b"slow:other"
    assert TWO_PART.slow_calls == slow_calls + 1
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await two_part(b"bad", timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "user_id: must not be empty"
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await two_part(b"bug", timeout=10)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert failed.value.details() == "internal error"
    assert TWO_PART.slow_calls == slow_calls + 1  # neither error went on to the rest


async def test_a_method_that_tries_first_answers_as_it_would_unwrapped(
    served: tuple[TelemetryInterceptor, RpcMetrics, grpc.aio.Channel],
) -> None:
    """The wrapper calls a `tries_first` method's parts itself: the same answers and errors
    as the method gives on a server without the wrapper, each counted, the failure's log line
    under the request id its trailer names."""
    telemetry, metrics, channel = served
    telemetry.ready = True
    lines: list[dict[str, Any]] = []
    capture = logging.Handler()
    capture.emit = lambda record: lines.append(json.loads(logs.JsonFormatter().format(record)))  # type: ignore[method-assign]
    logging.getLogger("allocsvc.api.errors").addHandler(capture)
    try:
        await _two_part_calls(channel, TWO_PART.slow_calls)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary(f"/{SERVICE}/TwoPart", None, None)(b"bug", timeout=10)
    finally:
        logging.getLogger("allocsvc.api.errors").removeHandler(capture)
    assert await _counted(metrics, "TwoPart", "OK", 2) == 2
    assert await _counted(metrics, "TwoPart", "INTERNAL", 2) == 2
    assert _count(metrics, "TwoPart", "INVALID_ARGUMENT") == 1
    (trailer_id,) = _ids(failed.value.trailing_metadata())
    (line,) = [entry for entry in lines if entry["request_id"] == trailer_id]
    assert line["msg"].startswith("unexpected error in") and "boom" in line["exc"]

    unwrapped = grpc.aio.server()
    unwrapped.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, _handlers()),)
    )
    port = unwrapped.add_insecure_port("127.0.0.1:0")
    await unwrapped.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            await _two_part_calls(plain, TWO_PART.slow_calls)
    finally:
        await unwrapped.stop(None)


def _samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")  # prometheus_client's own creation times
    }


class _Context:
    """What the wrapper asks of a call's context, for calls made without a server."""

    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str, trailers: Any = ()) -> None:
        self._code = code
        raise grpc.aio.AbortError()

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def done(self) -> bool:
        return False


async def _found(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """`request` back, unless it is b"missing": NOT_FOUND."""
    if request == b"missing":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return request


async def test_rpc_metrics_expose_what_prometheus_client_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls the wrapper counted scrape as prometheus_client's Counter and Histogram do on the
    same observations (bounds inclusive, past the last bound only +Inf)."""
    library = CollectorRegistry()
    calls = Counter("allocsvc_rpcs", "x", ["method", "code"], registry=library)
    latency = Histogram(
        "allocsvc_rpc_latency_seconds", "x", ["method", "code"], buckets=LATENCY_BUCKETS,
        registry=library,
    )  # fmt: skip
    ours = RpcMetrics()
    seconds = [0.0, 0.00005, 0.0001, 0.00011, 0.001, 0.0042, 0.3, 2.5, 9.99, 10.0, 10.5, 120.0]
    # One handler a method, its codes interleaved (the wrapper keeps its OK slot at hand).
    observed = [
        (method, code, s)
        for method in ("Allocate", "RecordConversion")
        for i, s in enumerate(seconds)
        for code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND)
        if code is grpc.StatusCode.OK or i < 7
    ]
    # Each call reads the clock as it starts and as it ends: the end is `s` past the start.
    readings: list[float] = []
    monkeypatch.setattr(time, "perf_counter", lambda: readings.pop(0))
    telemetry = TelemetryInterceptor(ours)
    handlers = {
        method: telemetry.wrap(
            f"/allocsvc.Allocator/{method}", grpc.unary_unary_rpc_method_handler(_found)
        )
        for method in ("Allocate", "RecordConversion")
    }
    for method, code, s in observed:
        readings += [0.0, s]
        request = b"x" if code is grpc.StatusCode.OK else b"missing"
        try:
            await handlers[method].unary_unary(request, _Context())
        except grpc.aio.AbortError:
            assert code is grpc.StatusCode.NOT_FOUND
        calls.labels(method, code.name).inc()
        latency.labels(method, code.name).observe(s)
    assert readings == []
    registry = CollectorRegistry()
    registry.register(ours)
    got, expected = _samples(registry), _samples(library)
    assert got == expected
    assert ("allocsvc_rpcs_total", (("code", "OK"), ("method", "Allocate")), 12.0) in got


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_a_handler_found_by_name_is_wrapped_once_and_unknown_names_are_not_kept() -> None:
    """grpc asks the generic handlers for every call's handler: one found by name is wrapped
    on the first call and found again, already wrapped, on the next ones."""
    generic = _InstrumentedGeneric(
        grpc.method_handlers_generic_handler(SERVICE, _handlers()), TelemetryInterceptor(None)
    )
    first = generic.service(_Details(METHOD))
    assert first is not None and first.unary_unary.__name__ == "observed"  # type: ignore[union-attr]
    assert generic.service(_Details(METHOD)) is first
    for i in range(50):
        assert generic.service(_Details(f"/{SERVICE}/Unknown{i}")) is None
    assert generic._by_name == {METHOD: first}
