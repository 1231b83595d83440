"""Where the allocation service hands off state that must outlive the process.

The service talks only to this interface; the in-memory journal keeps everything in the
process, the Postgres journal (allocsvc.store) makes it durable. Swapping one for the other
touches no servicer and no allocation logic.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from allocsvc.analytics import DailyTraffic

if TYPE_CHECKING:
    from allocsvc.allocation.experiments import Experiment
    from allocsvc.allocation.service import Assignment
    from allocsvc.core import AssignmentLog, MadeAssignments


@dataclass(frozen=True, slots=True)
class Conversion:
    assignment_id: str
    handle: int
    variant: int
    segment_key: str
    user_id: str
    value: float
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class StoredRecommendation:
    id: str
    handle: int
    kind: str
    dimensions: tuple[str, ...]
    expected_benefit: float
    reason: str
    status: str
    created_ms: int

    @staticmethod
    def from_payload(
        id: str, handle: int, kind: str, payload: Mapping[str, Any], status: str, created_ms: int
    ) -> StoredRecommendation:
        return StoredRecommendation(
            id=id,
            handle=handle,
            kind=kind,
            dimensions=tuple(str(d) for d in payload.get("dimensions", ())),
            expected_benefit=float(payload.get("expected_benefit", 0.0)),
            reason=str(payload.get("reason", "")),
            status=status,
            created_ms=created_ms,
        )


@dataclass(frozen=True, slots=True)
class TreeNodeRecord:
    """One node of a built tree as it is kept (parent = nearest kept ancestor for kept nodes)."""

    segment_hash: int
    parent_hash: int | None
    level: int
    segment_key: str
    allocations: int
    conversions: int
    value_sum: float
    stats: Mapping[str, Any]
    pruned: bool


class Journal(Protocol):
    async def save_experiment(self, experiment: Experiment, *, new: bool) -> Experiment:
        """Persist an experiment; a new one gets its internal handle here."""

    def admit(self, n: int) -> None:
        """Raise ResourceExhausted when the write-behind buffer cannot take `n` more
        assignments (called before they are decided, so nothing is counted and refused)."""

    def has_room(self, n: int) -> bool:
        """Whether `admit(n)` would pass now (asking counts no refusal)."""

    def assignment_made(self, assignment: Assignment) -> None:
        """Buffer an assignment for write-behind (never blocks, never does I/O inline)."""

    def assignments_made(self, made: MadeAssignments) -> None:
        """`assignment_made` for each of a batch's new assignments, in one call: their
        columns, no Python object per assignment."""

    def attach_log(self, log: AssignmentLog) -> bool:
        """Take the assignments Rust appends to `log` (unary allocations') as if each had been
        passed to `assignment_made`; False when this journal needs each passed instead."""

    async def stored_latest(
        self, experiment: Experiment, user_ids: Sequence[str]
    ) -> dict[str, Assignment]:
        """The latest assignment in the experiment of each of `user_ids` that the durable store
        has one of, by user (for assignments evicted from memory). Unavailable when the store
        cannot answer."""

    async def stored_assignment(
        self, assignment_id: str, experiments: Mapping[int, Experiment]
    ) -> Assignment | None:
        """An assignment by id as the durable store has it (`experiments` by handle names
        it); None when unknown."""

    async def record_conversions(self, conversions: Sequence[Conversion]) -> list[bool]:
        """Store conversions durably; True for each that was new (not a repeat of its
        assignment and idempotency key)."""

    async def traffic(self, handle: int) -> list[DailyTraffic]:
        """Daily visitors, allocations and conversions of an experiment, oldest first."""

    async def save_recommendation(
        self, handle: int, kind: str, payload: Mapping[str, Any]
    ) -> StoredRecommendation | None:
        """Store a pending recommendation; None when one of that kind is pending already."""

    async def recommendations(
        self, handle: int | None, status: str | None
    ) -> list[StoredRecommendation]: ...

    async def get_recommendation(self, recommendation_id: str) -> StoredRecommendation | None: ...

    async def decide_recommendation(
        self, recommendation_id: str, status: str, actor: str
    ) -> StoredRecommendation | None:
        """Accept or dismiss a pending recommendation; None when it is not pending."""

    async def audit(self, actor: str, action: str, target: str, details: Mapping[str, Any]) -> None:
        """Append to the audit log."""

    async def save_tree(self, handle: int, nodes: Sequence[TreeNodeRecord]) -> None:
        """Keep a built segment tree (parent links and node statistics) as a new version."""


class SharedState(Protocol):
    """Sticky assignments shared between replicas. Never raises: when the shared store is
    down, lookups miss and claims succeed locally."""

    async def sticky(self, handle: int, user_id: str) -> Assignment | None: ...

    async def claim(self, assignment: Assignment) -> Assignment: ...

    async def sticky_many(
        self, wanted: Sequence[tuple[int, str]]
    ) -> dict[tuple[int, str], Assignment]:
        """The sticky assignments found of these (experiment handle, user id) pairs."""

    async def claim_made(
        self, made: MadeAssignments, sticky: Iterable[int]
    ) -> dict[int, Assignment]:
        """Claim `made`'s new assignments of the `sticky` experiments (handles) in one round
        trip; return, by position in `made`, the ones that stand instead (another replica
        answered that user first)."""

    def assignment_made(self, assignment: Assignment) -> None: ...

    def assignments_made(self, made: MadeAssignments) -> None: ...

    async def assignment(self, assignment_id: str) -> Assignment | None: ...


# Some `MadeAssignments`, some single assignments, and their number: see `assignment_parts`.
AssignmentPart: TypeAlias = "tuple[list[MadeAssignments], list[Assignment], int]"


def assignment_parts(
    singles: Sequence[Assignment], made: Sequence[MadeAssignments], rows: int
) -> list[AssignmentPart]:
    """Assignments in parts of about `rows` (made, singles, their number): the singles first,
    then whole `made` groups (one may be larger than `rows`): a write-behind flush's blocks, a
    shared replica's script calls."""
    parts: list[AssignmentPart] = []
    group: list[MadeAssignments] = []
    part: list[Assignment] = []
    for i in range(0, len(singles), rows):
        if part:
            parts.append(([], part, len(part)))
        part = list(singles[i : i + rows])
    n = len(part)
    for m in made:
        if n and n + len(m) > rows:
            parts.append((group, part, n))
            group, part, n = [], [], 0
        group.append(m)
        n += len(m)
    if n:
        parts.append((group, part, n))
    return parts


class MemoryJournal:
    """Keeps experiments' handles, conversion idempotency, daily traffic, recommendations and
    the audit log in the process only."""

    def __init__(self) -> None:
        self._handles = itertools.count(1)
        self._seen: set[tuple[str, str]] = set()
        self._assignments = 0
        self._visitors: Counter[tuple[int, date]] = Counter()
        # Where Rust counts unary assignments by experiment and day (`attach_log`), not taken
        # into `_visitors` yet.
        self._logs: list[AssignmentLog] = []
        self._conversions: Counter[tuple[int, date]] = Counter()
        self._recommendations: dict[str, StoredRecommendation] = {}
        self._recommendation_ids = itertools.count(1)
        self.audit_log: list[tuple[str, str, str, dict[str, Any]]] = []
        self.trees: dict[int, list[Sequence[TreeNodeRecord]]] = {}
        # The UTC day of the latest assignment, by day number since the epoch (a cache).
        self._latest_day = (-1, _EPOCH)

    async def save_experiment(self, experiment: Experiment, *, new: bool) -> Experiment:
        if new:
            return experiment.with_changes(handle=next(self._handles))
        return experiment

    def admit(self, n: int) -> None:
        """Nothing is buffered: always room."""

    def has_room(self, n: int) -> bool:
        return True

    @property
    def assignments(self) -> int:
        """Assignments made since start."""
        self._take_logged()
        return self._assignments

    def assignment_made(self, assignment: Assignment) -> None:
        self._assignments += 1
        self._visitors[(assignment.handle, self._day_of(assignment.created_ms))] += 1

    def attach_log(self, log: AssignmentLog) -> bool:
        # Only counts by experiment and day are kept of them: Rust keeps those, no rows.
        log.count_days()
        self._logs.append(log)
        return True

    def _take_logged(self) -> None:
        for log in self._logs:
            for handle, day, n in log.take_days():
                self._assignments += n
                self._visitors[(handle, self._day(day))] += n

    def assignments_made(self, made: MadeAssignments) -> None:
        self._assignments += len(made)
        day = self._day_of(made.created_ms)
        for (handle, _), n in made.level_counts():
            self._visitors[(handle, day)] += n

    async def stored_latest(
        self, experiment: Experiment, user_ids: Sequence[str]
    ) -> dict[str, Assignment]:
        """Nothing outlives the process here: an evicted assignment is gone."""
        return {}

    async def stored_assignment(
        self, assignment_id: str, experiments: Mapping[int, Experiment]
    ) -> Assignment | None:
        return None

    def _day_of(self, created_ms: int) -> date:
        return self._day(created_ms // _DAY_MS)

    def _day(self, number: int) -> date:
        """The UTC day `number` days after the epoch."""
        if number != self._latest_day[0]:
            self._latest_day = (number, _EPOCH + timedelta(days=number))
        return self._latest_day[1]

    async def record_conversions(self, conversions: Sequence[Conversion]) -> list[bool]:
        counted = []
        for c in conversions:
            key = (c.assignment_id, c.idempotency_key)
            counted.append(key not in self._seen)
            if key not in self._seen:
                self._conversions[(c.handle, _today())] += 1
            self._seen.add(key)
        return counted

    async def traffic(self, handle: int) -> list[DailyTraffic]:
        self._take_logged()
        days = sorted({d for h, d in self._visitors if h == handle})
        return [
            DailyTraffic(
                d,
                self._visitors[(handle, d)],
                self._visitors[(handle, d)],
                self._conversions[(handle, d)],
            )
            for d in days
        ]

    async def save_recommendation(
        self, handle: int, kind: str, payload: Mapping[str, Any]
    ) -> StoredRecommendation | None:
        if any(
            r.handle == handle and r.kind == kind and r.status == "pending"
            for r in self._recommendations.values()
        ):
            return None
        stored = StoredRecommendation.from_payload(
            str(next(self._recommendation_ids)), handle, kind, payload, "pending", _now_ms()
        )
        self._recommendations[stored.id] = stored
        return stored

    async def recommendations(
        self, handle: int | None, status: str | None
    ) -> list[StoredRecommendation]:
        found = [
            r
            for r in self._recommendations.values()
            if (handle is None or r.handle == handle) and (status is None or r.status == status)
        ]
        return sorted(found, key=lambda r: (-r.created_ms, -int(r.id)))

    async def get_recommendation(self, recommendation_id: str) -> StoredRecommendation | None:
        return self._recommendations.get(recommendation_id)

    async def decide_recommendation(
        self, recommendation_id: str, status: str, actor: str
    ) -> StoredRecommendation | None:
        found = self._recommendations.get(recommendation_id)
        if found is None or found.status != "pending":
            return None
        decided = replace(found, status=status)
        self._recommendations[recommendation_id] = decided
        return decided

    async def audit(self, actor: str, action: str, target: str, details: Mapping[str, Any]) -> None:
        self.audit_log.append((actor, action, target, dict(details)))

    async def save_tree(self, handle: int, nodes: Sequence[TreeNodeRecord]) -> None:
        self.trees.setdefault(handle, []).append(list(nodes))


_DAY_MS = 86_400_000
_EPOCH = date(1970, 1, 1)


def _today() -> date:
    return datetime.now(UTC).date()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
