"""Several grpc.aio servers on one port (`ServerGroup`, the server's `accept_loops`): each takes
calls of its own, registration and stop reach every one."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from allocsvc.api.registration import ServerGroup

METHOD = "/test.Echo/Say"


class Tag(grpc.aio.ServerInterceptor):
    """Counts the calls its server takes."""

    def __init__(self, name: int, seen: Counter[int]) -> None:
        self.name, self.seen = name, seen

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        self.seen[self.name] += 1
        return await continuation(handler_call_details)


async def _say(request: bytes, context: Any) -> bytes:
    return b"heard " + request


def _handler() -> grpc.GenericRpcHandler[Any, Any]:
    return grpc.method_handlers_generic_handler(
        "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(_say)}
    )


def _group(size: int, seen: Counter[int]) -> ServerGroup:
    return ServerGroup(
        [
            grpc.aio.server(interceptors=[Tag(i, seen)], options=[("grpc.so_reuseport", 1)])
            for i in range(size)
        ]
    )


async def _call_over_connections(port: int, connections: int) -> list[bytes]:
    channels = [
        # Each its own connection (no shared subchannel).
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(connections)
    ]
    try:
        return await asyncio.gather(
            *(c.unary_unary(METHOD)(f"#{i}".encode()) for i, c in enumerate(channels))
        )
    finally:
        await asyncio.gather(*(c.close() for c in channels))


async def test_every_server_of_the_group_takes_calls_on_the_one_port() -> None:
    seen: Counter[int] = Counter()
    group = _group(2, seen)
    group.add_generic_rpc_handlers(iter([_handler()]))  # an iterator: read once, given to both
    port = group.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await group.start()
    try:
        answers = await _call_over_connections(port, 32)
    finally:
        await group.stop(None)
    assert answers == [f"heard #{i}".encode() for i in range(32)]
    # The kernel spread the 32 connections over both listening sockets (all on one: 2 in 2^32).
    assert set(seen) == {0, 1} and sum(seen.values()) == 32


async def test_a_stopped_group_serves_no_more() -> None:
    seen: Counter[int] = Counter()
    group = _group(3, seen)
    group.add_generic_rpc_handlers([_handler()])
    port = group.add_insecure_port("127.0.0.1:0")
    await group.start()
    assert await _call_over_connections(port, 3) == [b"heard #0", b"heard #1", b"heard #2"]
    await group.stop(None)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.unary_unary(METHOD)(b"late", timeout=2)
    assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert await group.wait_for_termination(0.1) is False


def test_a_group_needs_a_server() -> None:
    with pytest.raises(ValueError, match="servers"):
        ServerGroup([])
