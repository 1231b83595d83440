"""gRPC servicers: validate, translate proto <-> domain, map errors to status codes.

The only package that imports the generated code in allocsvc._proto.
"""

from __future__ import annotations

import grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc
from allocsvc.allocation.insights import Insights
from allocsvc.allocation.service import AllocationService

SERVICE_NAMES: tuple[str, ...] = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())


def add_services(
    server: grpc.aio.Server, service: AllocationService, insights: Insights, region: str
) -> None:
    """Register the Allocator and Admin servicers on a server."""
    from allocsvc.api.admin import AdminServicer
    from allocsvc.api.allocator import AllocatorServicer

    pb_grpc.add_AllocatorServicer_to_server(AllocatorServicer(service, region), server)  # type: ignore[no-untyped-call]
    pb_grpc.add_AdminServicer_to_server(AdminServicer(service, insights), server)  # type: ignore[no-untyped-call]
