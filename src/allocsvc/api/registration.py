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

from collections.abc import Iterable, Mapping
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
