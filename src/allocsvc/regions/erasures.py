"""Erasures reach every process of a region, not only the one that handled the RPC.

The process that erases a user (allocsvc.regions.gdpr) appends an entry to the region's
erasure log; every process serving the region polls the log (and, with Redis, is woken by a
notice) and, for each entry it has not seen, erases here every user it holds in memory whose
keyed hash matches: memory, the write-behind buffer (under the flush lock, so no flush writes
it back), and once more the region's Postgres rows and Redis keys, in case this process wrote
some from its memory after the first erasure.

The log holds HMAC-SHA256(key, user id), never the id: the key is random per deployment and
kept in the region's database. Matching hashes every user id held in memory once per poll that
brings new entries (erasures are rare), in slices so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)
# User ids hashed between two yields to the event loop while matching.
HASH_SLICE = 5_000
# Entries read per query of the log.
READ_BATCH = 1_000


@dataclass(frozen=True, slots=True)
class ErasureEntry:
    id: int
    user_hash: bytes
    receipt: str


class ErasureLog(Protocol):
    """The region's erasure log (allocsvc.store.erasurelog)."""

    async def key(self) -> bytes:
        """The deployment's hashing key (created by the first caller)."""

    async def append(self, user_hash: bytes, receipt: str) -> int:
        """Record an erasure; its id is larger than every id committed before it."""

    async def latest_id(self) -> int:
        """The largest id in the log (0 if empty)."""

    async def since(self, after_id: int, limit: int) -> Sequence[ErasureEntry]:
        """Entries with id > after_id, oldest first."""


def user_hash(key: bytes, user_id: str) -> bytes:
    """HMAC-SHA256 of the user id (RFC 2104): names the user in the log without the id."""
    return hmac.digest(key, user_id.encode(), "sha256")


# Erase a user everywhere in the region except the audit log: (user id, audit target) -> counts.
EraseHere = Callable[[str, str], Awaitable[dict[str, int]]]


class ErasureFollower:
    """Announces this process's erasures and applies everyone else's to this process."""

    def __init__(
        self,
        region: str,
        erasure_log: ErasureLog,
        held_users: Callable[[], Iterable[str]],
        erase_here: EraseHere,
    ) -> None:
        self.region = region
        self._log = erasure_log
        self._held_users = held_users
        self._erase_here = erase_here
        self._key: bytes | None = None
        self._last_id = 0
        # Entries this process wrote: already applied here.
        self._own: set[int] = set()
        # Users matched by an entry whose erasure here has not finished: user id -> receipt.
        self._unfinished: dict[str, str] = {}
        self._lock = asyncio.Lock()
        # Called with the new entry's id after an announcement (e.g. a Redis notice).
        self.on_announce: Callable[[int], Awaitable[None]] | None = None
        self.applied = 0

    async def start(self) -> None:
        """Read the key and the log's end. Call it before loading state from the stores: an
        erasure committed after this point is applied by the next poll, one before it is
        already absent from what is loaded."""
        self._key = await self._log.key()
        self._last_id = await self._log.latest_id()

    def hash(self, user_id: str) -> bytes:
        if self._key is None:
            raise RuntimeError("ErasureFollower.start() was not awaited")
        return user_hash(self._key, user_id)

    async def announce(self, user_id: str, receipt: str) -> None:
        """Tell every other process of the region that this user was erased."""
        entry_id = await self._log.append(self.hash(user_id), receipt)
        self._own.add(entry_id)
        if self.on_announce is not None:
            try:
                await self.on_announce(entry_id)
            except Exception:
                # The notice only speeds things up; the log is what every process reads.
                log.warning("erasure notice not sent", exc_info=True)

    async def poll(self) -> None:
        """`catch_up` for the scheduler."""
        await self.catch_up()

    async def catch_up(self) -> int:
        """Apply the entries not seen yet; return how many users were erased here. A user
        whose erasure here failed (a store down) is retried by the next call."""
        async with self._lock:
            while True:
                entries = await self._log.since(self._last_id, READ_BATCH)
                wanted = {e.user_hash: e.receipt for e in entries if e.id not in self._own}
                if wanted:
                    self._unfinished.update(await self._match(wanted))
                self._own.difference_update(e.id for e in entries)
                if entries:
                    self._last_id = entries[-1].id
                if len(entries) < READ_BATCH:
                    break
            erased = 0
            for user_id, receipt in list(self._unfinished.items()):
                removed = await self._erase_here(user_id, f"erasure:{receipt}")
                del self._unfinished[user_id]
                erased += 1
                log.info(
                    "erasure applied",
                    extra={"region": self.region, "receipt": receipt, "removed": removed},
                )
            self.applied += erased
            return erased

    async def _match(self, wanted: dict[bytes, str]) -> dict[str, str]:
        """The held users among the hashes, with their entry's receipt."""
        matched: dict[str, str] = {}
        held = list(set(self._held_users()))
        for start in range(0, len(held), HASH_SLICE):
            for user_id in held[start : start + HASH_SLICE]:
                receipt = wanted.get(self.hash(user_id))
                if receipt is not None:
                    matched[user_id] = receipt
            await asyncio.sleep(0)
        return matched
