"""How handlers reach the grpc.aio server: as generic handlers only.

grpc.aio keeps one outstanding "request call" task per *registered* method (the generated
`add_*_to_server` functions register every method of a service) plus one for generic handlers,
and for every incoming RPC its main loop runs `asyncio.wait` over all of them: adding and
removing a done-callback on each. With Admin's two dozen methods, health and reflection that
is about 30 tasks per Allocate, which cost allocsvc a measurable share of its unary throughput
against a bare echo server (bench/RESULTS.md, "Changes and what they moved"). Registered
with their generic handler only, every service shares one outstanding task; the method is
then found by name in the generic handlers' dictionaries, Allocator's first.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Generic = grpc.GenericRpcHandler[Any, Any]


class ServerView(grpc.aio.Server):
    """A grpc.aio server seen through a wrapper: everything goes to `server` unchanged;
    subclasses change how handlers are registered."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[Generic]) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service_name, method_handlers
        )

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)


class GenericOnly(ServerView):
    """Registers services through their generic handler alone (see the module's text)."""

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        # Every generated `add_*_to_server` (and allocsvc's own) registers the same handlers
        # as a generic handler first, which serves these methods.
        return None


class ServerGroup(ServerView):
    """Several grpc.aio servers of one process on one port (SO_REUSEPORT), on one event loop.

    A grpc.aio server takes its calls one at a time: it asks gRPC core for the next call only
    once the previous one has reached the event loop, and each hand-over crosses gRPC's poller
    thread. Calls that arrive meanwhile wait in core, and a burst drains one hand-over at a
    time. The kernel spreads connections over the group's listening sockets, so each server
    has calls of its own to take: with four, allocsvc answered 1.26x the unary calls at 0.83x
    the CPU per call (bench/RESULTS.md, "Batch fast path and hot-path log", item 25). Registration,
    start and stop go to every server; the first one's bound port is the group's.
    """

    def __init__(self, servers: Sequence[grpc.aio.Server]) -> None:
        if not servers:
            raise ValueError("servers: at least one")
        super().__init__(servers[0])
        self._servers = list(servers)

    @classmethod
    def sharing(
        cls,
        count: int,
        *,
        options: Sequence[tuple[str, Any]],
        max_waiting_calls: int,
        max_in_flight_rpcs: int | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] | None = None,
    ) -> ServerGroup:
        """`count` servers for one port (SO_REUSEPORT, `options` added) that share a process's
        bounds evenly, each taking its part rounded up: calls gRPC has read but no handler has
        taken yet (past it gRPC refuses new ones, all of them, not at random below it as by its
        default) and, if given, RPCs at once (past it RESOURCE_EXHAUSTED)."""
        waiting = math.ceil(max_waiting_calls / count)
        in_flight = None if max_in_flight_rpcs is None else math.ceil(max_in_flight_rpcs / count)
        shared = [
            *options,
            ("grpc.so_reuseport", 1),
            ("grpc.server.max_pending_requests", waiting),
            ("grpc.server.max_pending_requests_hard_limit", waiting + 1),
        ]
        return cls(
            [
                grpc.aio.server(
                    interceptors=interceptors, options=shared, maximum_concurrent_rpcs=in_flight
                )
                for _ in range(count)
            ]
        )

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[Generic]) -> None:
        handlers = list(generic_rpc_handlers)
        for server in self._servers:
            server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        for server in self._servers:
            server.add_registered_method_handlers(  # type: ignore[attr-defined]
                service_name, method_handlers
            )

    def _bind(self, address: str, bind: Callable[[grpc.aio.Server, str], int]) -> int:
        """The first server on `address` (port 0: a free one), the others on its port."""
        port = bind(self._servers[0], address)
        host = address.rpartition(":")[0]
        for server in self._servers[1:]:
            if bind(server, f"{host}:{port}") != port:
                raise RuntimeError(f"{host}:{port}: not bound again (is SO_REUSEPORT off?)")
        return port

    def add_insecure_port(self, address: str) -> int:
        return self._bind(address, lambda s, a: s.add_insecure_port(a))

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._bind(address, lambda s, a: s.add_secure_port(a, server_credentials))

    async def start(self) -> None:
        for server in self._servers:
            await server.start()

    async def stop(self, grace: float | None = None) -> None:
        await asyncio.gather(*(server.stop(grace) for server in self._servers))

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        done = await asyncio.gather(
            *(server.wait_for_termination(timeout) for server in self._servers)
        )
        return any(done)
