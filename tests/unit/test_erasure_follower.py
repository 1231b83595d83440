"""ErasureFollower: applies other processes' erasures to the users it holds, skips its own,
and retries a user whose erasure here failed."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import pytest

from allocsvc.regions.erasures import ErasureEntry, ErasureFollower, user_hash

pytestmark = pytest.mark.unit


class ListLog:
    """The log as a list (the Postgres one is covered end to end)."""

    def __init__(self) -> None:
        self.entries: list[ErasureEntry] = []

    async def key(self) -> bytes:
        return b"k" * 32

    async def append(self, user_hash: bytes, receipt: str) -> int:
        self.entries.append(ErasureEntry(len(self.entries) + 1, user_hash, receipt))
        return len(self.entries)

    async def latest_id(self) -> int:
        return len(self.entries)

    async def since(self, after_id: int, limit: int) -> Sequence[ErasureEntry]:
        return [e for e in self.entries if e.id > after_id][:limit]


class Process:
    def __init__(self, log: ListLog, held: set[str]) -> None:
        self.held = held
        self.erased: list[tuple[str, str]] = []
        self.failing = False
        self.follower = ErasureFollower("local", log, lambda: self.held, self.erase)

    async def erase(self, user_id: str, target: str) -> dict[str, int]:
        # Memory goes first, then the stores: a store failure leaves the user unheld.
        self.held.discard(user_id)
        if self.failing:
            raise RuntimeError("store down")
        self.erased.append((user_id, target))
        return {"memory.assignments": 1}


async def test_entries_reach_the_other_process_only() -> None:
    log = ListLog()
    log.entries.append(ErasureEntry(1, b"\0" * 32, "before-start"))
    one, two = Process(log, {"u1", "u2"}), Process(log, {"u1", "u3"})
    await one.follower.start()
    await two.follower.start()
    await one.follower.announce("u1", "r1")
    assert log.entries[-1].user_hash == hmac.digest(b"k" * 32, b"u1", "sha256")
    assert log.entries[-1].user_hash != hashlib.sha256(b"u1").digest()
    assert await one.follower.catch_up() == 0, "its own entry was applied when erasing"
    assert await two.follower.catch_up() == 1
    assert two.erased == [("u1", "erasure:r1")] and two.held == {"u3"}
    assert await two.follower.catch_up() == 0, "an entry is applied once"
    await two.follower.announce("nobody-holds-this", "r2")
    assert await one.follower.catch_up() == 0 and one.held == {"u1", "u2"}


async def test_a_failed_erasure_is_retried() -> None:
    log = ListLog()
    other = Process(log, {"u9"})
    await other.follower.start()
    await log.append(user_hash(b"k" * 32, "u9"), "r9")
    other.failing = True
    with pytest.raises(RuntimeError):
        await other.follower.catch_up()
    other.failing = False
    assert await other.follower.catch_up() == 1
    assert other.erased == [("u9", "erasure:r9")]
