"""Data protection: export everything held on a user, and erase it everywhere it lives.

A user's personal data in a region lives in its sources: the process's memory (sticky entries,
the assignment cache), the region's PostgreSQL (every table with a user id, write-behind
buffer) and its Redis (sticky entries, assignment records). Posterior counts, traffic and
segment statistics are anonymous aggregates and stay.

Every export and erasure is audited with who asked. The audit entry of an erasure does not
name the user: it carries a random receipt id (returned to the caller), and earlier audit
entries that named the user are renamed to that receipt, so no trace of the id is left.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from allocsvc.allocation.journal import Journal, MemoryJournal
from allocsvc.allocation.service import AllocationService, Assignment
from allocsvc.errors import InvalidRequest, Unavailable

Rows = dict[str, list[dict[str, Any]]]
EXPORT_ACTION = "user.export"
ERASE_ACTION = "user.erase"


class PersonalDataSource(Protocol):
    """One place a region keeps personal data."""

    @property
    def name(self) -> str: ...

    async def export(self, user_id: str) -> Rows:
        """Every record on the user, grouped by kind (table, key space)."""

    async def erase(self, user_id: str, audit_target: str) -> dict[str, int]:
        """Remove every record on the user; how many were removed, by kind."""


def audit_target(user_id: str) -> str:
    """Target of audit entries about a user (renamed on erasure)."""
    return f"user:{user_id}"


@dataclass(frozen=True, slots=True)
class UserExport:
    region: str
    user_id: str
    exported_ms: int
    # source name -> kind -> records
    sources: dict[str, Rows]

    def as_json_data(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "region": self.region,
            "exported_ms": self.exported_ms,
            "sources": self.sources,
        }

    @property
    def record_count(self) -> int:
        return sum(len(rows) for kinds in self.sources.values() for rows in kinds.values())


@dataclass(frozen=True, slots=True)
class Erasure:
    region: str
    receipt: str
    # "<source>.<kind>" -> records removed
    removed: dict[str, int] = field(default_factory=dict)


class MemoryUserData:
    """The user's assignments held by the allocation service in this process."""

    name = "memory"

    def __init__(self, service: AllocationService) -> None:
        self._service = service

    async def export(self, user_id: str) -> Rows:
        held = self._service.user_assignments(user_id)
        return {"assignments": [_assignment(a) for a in held]} if held else {}

    async def erase(self, user_id: str, audit_target: str) -> dict[str, int]:
        return {"assignments": len(self._service.forget_user(user_id))}


class LearningData(Protocol):
    def user_records(self, user_id: str) -> Rows: ...

    def held_user_ids(self) -> set[str]: ...

    def forget_user(self, user_id: str) -> int: ...


class LearningUserData:
    """The user's rows in the learning training sample and similarity index (in memory)."""

    name = "learning"

    def __init__(self, learning: LearningData) -> None:
        self._learning = learning

    async def export(self, user_id: str) -> Rows:
        return self._learning.user_records(user_id)

    async def erase(self, user_id: str, audit_target: str) -> dict[str, int]:
        return {"records": self._learning.forget_user(user_id)}


class DataProtection:
    """Export and erasure of one user's data in one region."""

    def __init__(
        self,
        region: str,
        service: AllocationService,
        journal: Journal,
        sources: Sequence[PersonalDataSource] = (),
    ) -> None:
        self.region = region
        self._service = service
        self._journal = journal
        self._memory = MemoryUserData(service)
        self._sources: list[PersonalDataSource] = [self._memory, *sources]
        # Tells the region's other processes (user id, receipt); see allocsvc.regions.erasures.
        self.announce: Callable[[str, str], Awaitable[None]] | None = None

    def add_source(self, source: PersonalDataSource) -> None:
        """Another place holding personal data (for example a learned-embeddings store)."""
        self._sources.append(source)

    def _check(self, user_id: str) -> None:
        if not user_id:
            raise InvalidRequest("user_id", "must not be empty")
        limit = self._service.limits.max_user_id_chars
        if len(user_id) > limit:
            raise InvalidRequest("user_id", f"longer than {limit} characters")
        if "\x00" in user_id:
            raise InvalidRequest("user_id", "must not contain NUL characters")

    async def export(self, user_id: str, actor: str) -> UserExport:
        self._check(user_id)
        sources: dict[str, Rows] = {}
        for source in self._sources:
            try:
                found = await source.export(user_id)
            except Exception as exc:
                raise Unavailable(f"{source.name} unavailable: {type(exc).__name__}") from None
            if found:
                sources[source.name] = found
        exported = UserExport(self.region, user_id, time.time_ns() // 1_000_000, sources)
        await self._journal.audit(
            actor,
            EXPORT_ACTION,
            audit_target(user_id),
            {"region": self.region, "records": exported.record_count},
        )
        return exported

    async def erase(self, user_id: str, actor: str, reason: str = "") -> Erasure:
        """Erase everywhere; safe to repeat (a failed store raises Unavailable, and a retry
        erases what is left)."""
        self._check(user_id)
        receipt = secrets.token_hex(8)
        target = f"erasure:{receipt}"
        removed = await self.erase_here(user_id, target)
        if self.announce is not None:
            try:
                await self.announce(user_id, receipt)
            except Exception as exc:
                # Not done until every process of the region will hear of it: a retry is.
                raise Unavailable(f"erasure log unavailable: {type(exc).__name__}") from None
        if isinstance(self._journal, MemoryJournal):
            self._journal.audit_log[:] = [
                (a, act, target if t == audit_target(user_id) else t, d)
                for a, act, t, d in self._journal.audit_log
            ]
        await self._journal.audit(
            actor,
            ERASE_ACTION,
            target,
            {"region": self.region, "removed": removed, "reason": reason},
        )
        return Erasure(self.region, receipt, removed)

    async def erase_here(self, user_id: str, target: str) -> dict[str, int]:
        """Erase the user from every source (this process's memory, the region's stores), not
        the audit log; "<source>.<kind>" -> records removed. Raises Unavailable if a store
        fails (safe to repeat)."""
        removed: dict[str, int] = {}
        for source in self._sources:
            try:
                counts = await source.erase(user_id, target)
            except Exception as exc:
                raise Unavailable(f"{source.name} unavailable: {type(exc).__name__}") from None
            for kind, n in counts.items():
                removed[f"{source.name}.{kind}"] = removed.get(f"{source.name}.{kind}", 0) + n
        # A lookup that ran while the stores were being erased may have cached the user again.
        for kind, n in (await self._memory.erase(user_id, target)).items():
            removed[f"memory.{kind}"] += n
        return removed


def _assignment(a: Assignment) -> dict[str, Any]:
    return {
        "id": a.id,
        "experiment_id": a.experiment_key,
        "user_id": a.user_id,
        "variant": a.variant,
        "segment_key": a.segment_key,
        "cascade_level": a.cascade_level,
        "propensity": a.propensity,
        "created_ms": a.created_ms,
    }
