"""Where the allocation service hands off state that must outlive the process.

The service talks only to this interface; the in-memory journal keeps everything in the
process, the Postgres journal (allocsvc.store) makes it durable. Swapping one for the other
touches no servicer and no allocation logic.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from allocsvc.allocation.experiments import Experiment
    from allocsvc.allocation.service import Assignment


@dataclass(frozen=True, slots=True)
class Conversion:
    assignment_id: str
    handle: int
    variant: int
    segment_key: str
    user_id: str
    value: float
    idempotency_key: str


class Journal(Protocol):
    async def save_experiment(self, experiment: Experiment, *, new: bool) -> Experiment:
        """Persist an experiment; a new one gets its internal handle here."""

    def assignment_made(self, assignment: Assignment) -> None:
        """Buffer an assignment for write-behind (never blocks, never does I/O inline)."""

    async def record_conversions(self, conversions: Sequence[Conversion]) -> list[bool]:
        """Store conversions durably; True for each that was new (not a repeat of its
        assignment and idempotency key)."""


class SharedState(Protocol):
    """Sticky assignments shared between replicas. Never raises: when the shared store is
    down, lookups miss and claims succeed locally."""

    async def sticky(self, handle: int, user_id: str) -> Assignment | None: ...

    async def claim(self, assignment: Assignment) -> Assignment: ...

    def assignment_made(self, assignment: Assignment) -> None: ...

    async def assignment(self, assignment_id: str) -> Assignment | None: ...


class MemoryJournal:
    """Keeps experiments' handles and conversion idempotency in the process only."""

    def __init__(self) -> None:
        self._handles = itertools.count(1)
        self._seen: set[tuple[str, str]] = set()
        self.assignments = 0

    async def save_experiment(self, experiment: Experiment, *, new: bool) -> Experiment:
        if new:
            return experiment.with_changes(handle=next(self._handles))
        return experiment

    def assignment_made(self, assignment: Assignment) -> None:
        self.assignments += 1

    async def record_conversions(self, conversions: Sequence[Conversion]) -> list[bool]:
        counted = []
        for c in conversions:
            key = (c.assignment_id, c.idempotency_key)
            counted.append(key not in self._seen)
            self._seen.add(key)
        return counted
