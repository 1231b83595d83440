"""Concurrent lookups taken together in rounds (`allocsvc.store.rounds.Rounds`)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from allocsvc.store.rounds import Rounds


class Table:
    """A lookup that records what each call asked and can be held until released."""

    def __init__(self, rows: Mapping[tuple[int, str], str]) -> None:
        self.rows = rows
        self.calls: list[tuple[int, list[str]]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail: Exception | None = None

    async def look_up(self, key: int, items: list[str]) -> dict[str, str]:
        self.calls.append((key, items))
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return {i: self.rows[(key, i)] for i in items if (key, i) in self.rows}


ROWS = {(1, "ann"): "a1", (1, "bob"): "b1", (2, "ann"): "a2", (2, "cat"): "c2"}


async def test_lookups_made_together_share_one_call_per_key() -> None:
    table = Table(ROWS)
    rounds: Rounds[int, str, str] = Rounds(table.look_up)
    found = await asyncio.gather(
        rounds.find(1, ["ann"]),
        rounds.find(1, ["bob", "ann", "dan"]),
        rounds.find(2, ["ann", "cat"]),
        rounds.find(2, ["dan"]),
    )
    # Each caller gets what was found of its own items only.
    assert found == [{"ann": "a1"}, {"bob": "b1", "ann": "a1"}, {"ann": "a2", "cat": "c2"}, {}]
    assert sorted(table.calls) == [(1, ["ann", "bob", "dan"]), (2, ["ann", "cat", "dan"])]
    assert rounds.rounds == 1


async def test_lookups_made_during_a_round_wait_for_the_next_one_together() -> None:
    table = Table(ROWS)
    table.release.clear()
    rounds: Rounds[int, str, str] = Rounds(table.look_up)
    first = asyncio.create_task(rounds.find(1, ["ann"]))
    # The lookup starts a few loop turns later: waited for, since a sleep of 10 ms could end
    # first on a loop held up that long.
    async with asyncio.timeout(10):
        while not table.calls:
            await asyncio.sleep(0.001)
    assert table.calls == [(1, ["ann"])]
    later = [asyncio.create_task(rounds.find(1, [u])) for u in ("bob", "cat", "ann")]
    await asyncio.sleep(0.01)
    assert len(table.calls) == 1  # still the first round
    table.release.set()
    assert await first == {"ann": "a1"}
    assert [await t for t in later] == [{"bob": "b1"}, {}, {"ann": "a1"}]
    assert table.calls == [(1, ["ann"]), (1, ["bob", "cat", "ann"])]
    assert rounds.rounds == 2


async def test_a_failed_lookup_fails_its_round_and_the_next_round_runs() -> None:
    table = Table(ROWS)
    table.fail = ConnectionResetError("gone")
    rounds: Rounds[int, str, str] = Rounds(table.look_up)
    results = await asyncio.gather(
        rounds.find(1, ["ann"]), rounds.find(1, ["bob"]), return_exceptions=True
    )
    assert [type(r) for r in results] == [ConnectionResetError, ConnectionResetError]
    table.fail = None
    assert await rounds.find(1, ["bob"]) == {"bob": "b1"}


async def test_a_caller_that_gives_up_leaves_the_round_to_the_others() -> None:
    table = Table(ROWS)
    table.release.clear()
    rounds: Rounds[int, str, str] = Rounds(table.look_up)
    impatient = asyncio.create_task(rounds.find(1, ["ann"]))
    patient = asyncio.create_task(rounds.find(1, ["bob"]))
    await asyncio.sleep(0.01)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    table.release.set()
    assert await patient == {"bob": "b1"}
