"""MemoryJournal counts each assignment on the UTC day it was made, one at a time or in bulk."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import Assignment

pytestmark = pytest.mark.unit


def _at(moment: datetime, n: int, handle: int = 1) -> Assignment:
    ms = int(moment.timestamp() * 1000)
    return Assignment(f"a-{handle}-{ms}-{n}", "e", handle, f"u{n}", 0, "", 0, 0.5, ms)


async def test_days_one_at_a_time_and_in_bulk_agree() -> None:
    late = datetime(2026, 3, 1, 23, 59, 59, 999_000, tzinfo=UTC)
    early = datetime(2026, 3, 2, 0, 0, 0, tzinfo=UTC)
    made = [_at(late, i) for i in range(3)] + [_at(early, i) for i in range(5)]
    made += [_at(late, i, handle=2) for i in range(2)]
    single, bulk = MemoryJournal(), MemoryJournal()
    for a in made:
        single.assignment_made(a)
    bulk.assignments_made(made[:4])
    bulk.assignments_made(made[4:])
    for journal in (single, bulk):
        assert journal.assignments == 10
        days = [(t.day, t.visitors, t.allocations) for t in await journal.traffic(1)]
        assert days == [(date(2026, 3, 1), 3, 3), (date(2026, 3, 2), 5, 5)]
        assert [(t.day, t.visitors) for t in await journal.traffic(2)] == [(date(2026, 3, 1), 2)]
