"""Server reflection that also resolves method names (`allocsvc.v1.Allocator.Allocate`).

The upb descriptor pool of Python protobuf finds services and messages by name but not
methods, so `ghz --call allocsvc.v1.Allocator/Allocate` and `grpcurl describe` of a method
got "symbol not found". A method resolves to the file of its service.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection


class MethodAwarePool:
    """The default descriptor pool, plus method symbols."""

    def __init__(self) -> None:
        self._pool = descriptor_pool.Default()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in service.methods_by_name:
                raise KeyError(symbol) from None
            return service.file


def enable(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    reflection.enable_server_reflection(
        (*service_names, reflection.SERVICE_NAME),
        server,
        pool=MethodAwarePool(),  # type: ignore[arg-type]  # duck-typed pool
    )
