"""The telemetry wrapper behaves the same whether it wraps handlers at registration (no
interceptor per call, the server's default without auth; with registered methods or, as the
server registers them, generic handlers only) or as a server interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from allocsvc.api.errors import maps_errors
from allocsvc.api.registration import GenericOnly
from allocsvc.api.telemetry import RpcMetrics, TelemetryInterceptor
from allocsvc.errors import InvalidRequest
from allocsvc.logs import REQUEST_ID_KEY

pytestmark = pytest.mark.unit

SERVICE = "test.Gated"
METHOD = f"/{SERVICE}/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    raise ValueError("boom")


class _Refusing:
    @maps_errors
    async def refuse(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        raise InvalidRequest("user_id", "must not be empty")


def _handlers() -> dict[str, Any]:
    return {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Refuse": grpc.unary_unary_rpc_method_handler(_Refusing().refuse),
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
    params=[_with_registration, _generic_only, _with_interceptor],
    ids=["registration", "generic-only", "interceptor"],
)
async def served(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[TelemetryInterceptor, RpcMetrics, grpc.aio.Channel]]:
    metrics = RpcMetrics()
    telemetry = TelemetryInterceptor(metrics, gated=[SERVICE])
    build: Build = request.param
    server = build(telemetry)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield telemetry, metrics, channel
    finally:
        await channel.close(None)
        await server.stop(None)


def _ids(metadata: Any) -> list[str]:
    return [v for k, v in tuple(metadata or ()) if k == REQUEST_ID_KEY]


def _count(metrics: RpcMetrics, method: str, code: str) -> float:
    for family in metrics.calls.collect():
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
    assert _count(metrics, "Echo", "UNAVAILABLE") == 1

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
    assert _count(metrics, "Echo", "OK") == 4

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
    assert _count(metrics, "Fail", "UNKNOWN") == 1
