"""Cross-region sync of aggregate counts.

Each region publishes its own totals per counter (experiment key, segment hash, variant) —
counts only, never user ids — and every other region stores the latest totals it has seen from
that source. A region's global counts are its own totals plus those latest remote totals.
Because totals only grow at their source and the receiver keeps the latest, a repeated or
interrupted run never double-counts: running again converges to the same values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

# (experiment key, segment hash, variant, allocations, conversions, value sum)
TotalRow = tuple[str, int, int, int, int, float]


class RegionCounts(Protocol):
    async def own_totals(self) -> list[TotalRow]: ...

    async def global_totals(self) -> list[TotalRow]: ...

    async def remote_totals(self) -> list[TotalRow]: ...

    async def save_remote(self, source_region: str, rows: Sequence[TotalRow]) -> None: ...


@dataclass(frozen=True, slots=True)
class SyncReport:
    published: dict[str, int]
    # (source, destination) pairs not delivered this round (a store was down)
    failed: tuple[tuple[str, str], ...]


async def sync_once(regions: Mapping[str, RegionCounts]) -> SyncReport:
    """Deliver every region's own totals to every other region. A region whose store is down
    is skipped (as source or destination) and catches up on a later run."""
    published: dict[str, int] = {}
    failed: list[tuple[str, str]] = []
    for source, counts in regions.items():
        try:
            rows = await counts.own_totals()
        except Exception as exc:
            log.warning(
                "region sync: source unavailable", extra={"region": source, "error": repr(exc)}
            )
            failed.extend((source, d) for d in regions if d != source)
            continue
        published[source] = len(rows)
        for destination, other in regions.items():
            if destination == source:
                continue
            try:
                await other.save_remote(source, rows)
            except Exception as exc:
                log.warning(
                    "region sync: destination unavailable",
                    extra={"region": destination, "source": source, "error": repr(exc)},
                )
                failed.append((source, destination))
    return SyncReport(published, tuple(failed))
