"""The telemetry wrapper behaves the same whether it wraps handlers at registration (no
interceptor per call, the server's default without auth) or as a server interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from allocsvc.api.telemetry import REQUEST_ID_KEY, RpcMetrics, TelemetryInterceptor

pytestmark = pytest.mark.unit

SERVICE = "test.Gated"
METHOD = f"/{SERVICE}/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    raise ValueError("boom")


def _handlers() -> dict[str, Any]:
    return {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
    }


def _with_registration(telemetry: TelemetryInterceptor) -> grpc.aio.Server:
    server = grpc.aio.server()
    registering = telemetry.registering(server)
    registering.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, _handlers()),)
    )
    registering.add_registered_method_handlers(SERVICE, _handlers())  # type: ignore[attr-defined]
    return server


def _with_interceptor(telemetry: TelemetryInterceptor) -> grpc.aio.Server:
    server = grpc.aio.server(interceptors=[telemetry])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, _handlers()),))
    return server


Build = Callable[[TelemetryInterceptor], grpc.aio.Server]


@pytest.fixture(params=[_with_registration, _with_interceptor], ids=["registration", "interceptor"])
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

    telemetry.ready = True
    call = echo(b"hello", metadata=((REQUEST_ID_KEY, "req-7"),), timeout=10)
    assert await call == b"hello"
    assert (REQUEST_ID_KEY, "req-7") in tuple(await call.trailing_metadata())

    fresh = []
    for _ in range(3):
        call = echo(b"x", metadata=((REQUEST_ID_KEY, "not usable!"),), timeout=10)
        await call
        ids = [v for k, v in await call.trailing_metadata() if k == REQUEST_ID_KEY]
        assert len(ids) == 1 and ids[0] != "not usable!"
        fresh.append(ids[0])
    assert len(set(fresh)) == 3
    assert _count(metrics, "Echo", "OK") == 4

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await channel.unary_unary(f"/{SERVICE}/Fail", None, None)(b"", timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNKNOWN
    assert _count(metrics, "Fail", "UNKNOWN") == 1
