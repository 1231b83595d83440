"""gRPC servicers: validate, translate proto <-> domain, map errors to status codes.

The only package that imports the generated code in allocsvc._proto.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc
from allocsvc.allocation.insights import Insights
from allocsvc.allocation.service import AllocationService
from allocsvc.regions.router import Regions

if TYPE_CHECKING:
    from allocsvc.learning.service import Learning

SERVICE_NAMES: tuple[str, ...] = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())


def add_services(
    server: grpc.aio.Server,
    service: AllocationService,
    insights: Insights,
    region: str,
    regions: Regions | None = None,
    learning: Learning | None = None,
) -> None:
    """Register the Allocator and Admin servicers on a server (with `regions`, requests are
    routed to their region's service)."""
    from allocsvc.api.admin import AdminServicer
    from allocsvc.api.allocator import AllocatorServicer, add_allocator

    allocator = AllocatorServicer(service, region, regions if regions and regions.multi else None)
    admin = AdminServicer(service, insights)
    if regions is not None:
        admin.bind_regions(regions)
    if learning is not None:
        admin.bind_learning(learning)
    add_allocator(allocator, server)
    pb_grpc.add_AdminServicer_to_server(admin, server)  # type: ignore[no-untyped-call]
