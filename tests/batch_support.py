"""A servicer with one running experiment "e" of three variants (not sticky unless asked), for
tests of what a batch makes; a journal that keeps each batch's new assignments; shared state in
Redis."""

from __future__ import annotations

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import MemoryJournal, SharedState
from allocsvc.allocation.service import AllocationService, Limits
from allocsvc.api import convert
from allocsvc.api.allocator import AllocatorServicer
from allocsvc.context import Extractor
from allocsvc.core import Engine, MadeAssignments
from allocsvc.store.pump import DeltaPump
from allocsvc.store.redis import RedisShared


class Keeping(MemoryJournal):
    """Keeps each batch's new assignments."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[MadeAssignments] = []

    def assignments_made(self, made: MadeAssignments) -> None:
        super().assignments_made(made)
        self.made.append(made)


async def servicer(
    journal: MemoryJournal | None = None,
    shared: SharedState | None = None,
    sticky: bool = False,
    limits: Limits | None = None,
) -> tuple[AllocationService, AllocatorServicer]:
    service = AllocationService(
        Engine(), journal or MemoryJournal(), Extractor(), limits or Limits(), shared=shared
    )
    experiment = pb.Experiment(
        id="e",
        status=pb.EXPERIMENT_STATUS_RUNNING,
        variants=[pb.Variant(id="A"), pb.Variant(id="B"), pb.Variant(id="C")],
        sticky=sticky,
    )
    await service.create_experiment(convert.experiment_from_pb(experiment))
    return service, AllocatorServicer(service, "local")


def redis_shared(url: str, namespace: str) -> RedisShared:
    """Shared state in Redis at `url` under `namespace`, its counts going nowhere."""
    shared = RedisShared(url, namespace=namespace)
    shared.bind(
        DeltaPump(list),
        load_counts=lambda rows: None,
        snapshot=lambda handle: [],
        experiments=list,
        on_health=lambda healthy: None,
    )
    return shared
