"""A servicer with one running, non-sticky experiment "e" of three variants, for tests of what a
batch makes."""

from __future__ import annotations

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import AllocationService
from allocsvc.api import convert
from allocsvc.api.allocator import AllocatorServicer
from allocsvc.context import Extractor
from allocsvc.core import Engine


async def servicer(
    journal: MemoryJournal | None = None,
) -> tuple[AllocationService, AllocatorServicer]:
    service = AllocationService(Engine(), journal or MemoryJournal(), Extractor())
    experiment = pb.Experiment(
        id="e",
        status=pb.EXPERIMENT_STATUS_RUNNING,
        variants=[pb.Variant(id="A"), pb.Variant(id="B"), pb.Variant(id="C")],
        sticky=False,
    )
    await service.create_experiment(convert.experiment_from_pb(experiment))
    return service, AllocatorServicer(service, "local")
