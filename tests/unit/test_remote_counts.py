"""Global posteriors: other regions' totals are an offset on a region's engine that decisions
see, that the region never persists or shares as its own, and that survives Redis refreshes."""

from __future__ import annotations

import pytest

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import AllocationRequest, AllocationService
from allocsvc.api import convert
from allocsvc.context import Extractor
from allocsvc.core import Engine, key_hash, seed_rng

pytestmark = pytest.mark.unit
ROOT = key_hash("")
SIGNED_ROOT = ROOT - (1 << 64) if ROOT >= 1 << 63 else ROOT


async def _service() -> tuple[AllocationService, int]:
    service = AllocationService(Engine(), MemoryJournal(), Extractor())
    created = await service.create_experiment(
        convert.experiment_from_pb(
            pb.Experiment(
                id="x",
                status=pb.EXPERIMENT_STATUS_RUNNING,
                sticky=False,
                variants=[pb.Variant(id="A"), pb.Variant(id="B")],
            )
        )
    )
    return service, created.handle


def _root(rows: list[tuple[int, int, int, int, int, float]]) -> dict[int, tuple[int, int]]:
    return {v: (a, k) for _, s, v, a, k, _x in rows if s == ROOT}


async def test_offset_is_seen_by_decisions_but_never_persisted() -> None:
    seed_rng(1)
    service, handle = await _service()
    for i in range(10):
        await service.allocate(AllocationRequest("x", f"u{i}"))
    own = _root(service.snapshot(handle))
    assert sum(a for a, _ in own.values()) == 10
    assert service.take_deltas()  # the region's own allocations, persisted as usual

    # Another region: B converts at 50% over 1000 allocations, A never over 1000.
    applied = service.set_remote_counts(
        [("x", SIGNED_ROOT, 0, 1000, 0, 0.0), ("x", SIGNED_ROOT, 1, 1000, 500, 0.0),
         ("unknown", SIGNED_ROOT, 0, 5, 5, 0.0), ("x", SIGNED_ROOT, 7, 5, 5, 0.0)]
    )  # fmt: skip
    assert applied == 2
    assert _root(service.snapshot(handle)) == {
        v: (a + 1000, k + (500 if v == 1 else 0)) for v, (a, k) in own.items()
    }
    assert _root(service.own_snapshot(handle)) == own
    assert service.take_deltas() == []  # nothing of the offset is written as this region's
    picks = [await service.allocate(AllocationRequest("x", f"v{i}")) for i in range(200)]
    assert sum(p.variant.key == "B" for p in picks) > 190

    # The offset is replaced, not added again; it may shrink (wrapping arithmetic).
    service.set_remote_counts([("x", SIGNED_ROOT, 0, 400, 0, 0.0)])
    now_own = _root(service.own_snapshot(handle))
    assert _root(service.snapshot(handle)) == {
        v: (a + (400 if v == 0 else 0), k) for v, (a, k) in now_own.items()
    }


async def test_redis_refresh_keeps_the_offset() -> None:
    service, handle = await _service()
    service.set_remote_counts([("x", SIGNED_ROOT, 1, 50, 20, 3.0)])
    # Redis hands back the region's own merged totals (of every replica).
    service.replace_counts([(handle, ROOT, 0, 7, 1, 0.0), (handle, ROOT, 1, 9, 2, 0.0)])
    assert _root(service.snapshot(handle)) == {0: (7, 1), 1: (59, 22)}
    assert _root(service.own_snapshot(handle)) == {0: (7, 1), 1: (9, 2)}
