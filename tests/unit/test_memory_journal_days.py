"""MemoryJournal counts each assignment on the UTC day it was made, one at a time or a batch's
in one call (per experiment)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime

import pytest

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import AllocationService, Assignment
from allocsvc.api import convert
from allocsvc.context import Extractor
from allocsvc.core import Engine

pytestmark = pytest.mark.unit


def _at(moment: datetime, n: int, handle: int = 1) -> Assignment:
    ms = int(moment.timestamp() * 1000)
    return Assignment(f"a-{handle}-{ms}-{n}", "e", handle, f"u{n}", 0, "", 0, 0.5, ms)


async def test_days_of_single_assignments_follow_utc_midnight() -> None:
    late = datetime(2026, 3, 1, 23, 59, 59, 999_000, tzinfo=UTC)
    early = datetime(2026, 3, 2, 0, 0, 0, tzinfo=UTC)
    made = [_at(late, i) for i in range(3)] + [_at(early, i) for i in range(5)]
    made += [_at(late, i, handle=2) for i in range(2)]
    journal = MemoryJournal()
    for a in made:
        journal.assignment_made(a)
    assert journal.assignments == 10
    days = [(t.day, t.visitors, t.allocations) for t in await journal.traffic(1)]
    assert days == [(date(2026, 3, 1), 3, 3), (date(2026, 3, 2), 5, 5)]
    assert [(t.day, t.visitors) for t in await journal.traffic(2)] == [(date(2026, 3, 1), 2)]


def test_a_batch_counts_its_assignments_per_experiment_on_its_day() -> None:
    journal = MemoryJournal()
    service = AllocationService(Engine(), journal, Extractor())
    for key in ("one", "two"):
        experiment = pb.Experiment(
            id=key,
            status=pb.EXPERIMENT_STATUS_RUNNING,
            variants=[pb.Variant(id="A"), pb.Variant(id="B")],
        )
        asyncio.run(service.create_experiment(convert.experiment_from_pb(experiment)))
    handles = {e.key: e.handle for e in service.list_experiments()}
    keys = ["one"] * 3 + ["two"] * 2 + ["one"]
    request = pb.AllocateBatchRequest(
        requests=[pb.AllocateRequest(experiment_id=k, user_id=f"u{i}") for i, k in enumerate(keys)]
    )
    before = datetime.now(UTC).date()
    prepared = service.prepare_batch(request.SerializeToString())
    assert prepared is not None
    service.finish_batch(prepared, "", {}, {})
    after = datetime.now(UTC).date()
    assert journal.assignments == 6
    one = asyncio.run(journal.traffic(handles["one"]))
    two = asyncio.run(journal.traffic(handles["two"]))
    assert [(t.visitors, t.allocations) for t in one] == [(4, 4)]
    assert [(t.visitors, t.allocations) for t in two] == [(2, 2)]
    assert one[0].day in {before, after}
