"""Concurrent lookups taken together, in rounds.

A lookup of assignments memory no longer holds costs the same few round trips to PostgreSQL
(the blocks' ids, the payloads whose filters may hold what it looks for, one query) for one
user as for hundreds. Conversions of such users arrive one call each, dozens in flight, so
`Rounds` gives them one store call per round the way the group commit gives them one
transaction: a lookup that finds no round running starts one at once; those that arrive
meanwhile wait for the next round, which takes all of them (bench/RESULTS.md item 38).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T", bound=Hashable)
R = TypeVar("R")


class Rounds(Generic[K, T, R]):
    """Calls of `look_up(key, items)` made by many callers at once, one per key per round.

    `find(key, items)` answers what `look_up` found of its own items. A failed `look_up` fails
    every caller of that round and key; a caller that gives up (cancelled) leaves the round to
    the others.
    """

    def __init__(self, look_up: Callable[[K, list[T]], Awaitable[Mapping[T, R]]]) -> None:
        self._look_up = look_up
        self._waiting: list[tuple[K, Sequence[T], asyncio.Future[dict[T, R]]]] = []
        self._running: asyncio.Task[None] | None = None
        self.rounds = 0

    async def find(self, key: K, items: Sequence[T]) -> dict[T, R]:
        answer: asyncio.Future[dict[T, R]] = asyncio.get_running_loop().create_future()
        self._waiting.append((key, items, answer))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._rounds(), name="lookup-rounds")
        return await answer

    async def _rounds(self) -> None:
        while self._waiting:
            taken, self._waiting = self._waiting, []
            by_key: dict[K, list[tuple[Sequence[T], asyncio.Future[dict[T, R]]]]] = {}
            for key, items, answer in taken:
                by_key.setdefault(key, []).append((items, answer))
            self.rounds += 1
            try:
                await asyncio.gather(*(self._round(key, asked) for key, asked in by_key.items()))
            finally:
                # Cancelled (the loop is closing): nobody is left waiting forever.
                for _, _, answer in taken:
                    answer.cancel()

    async def _round(
        self, key: K, asked: list[tuple[Sequence[T], asyncio.Future[dict[T, R]]]]
    ) -> None:
        items = list(dict.fromkeys(item for wanted, _ in asked for item in wanted))
        try:
            found = await self._look_up(key, items)
        except Exception as exc:
            for _, answer in asked:
                if not answer.done():
                    answer.set_exception(exc)
            return
        for wanted, answer in asked:
            if not answer.done():
                answer.set_result({item: found[item] for item in wanted if item in found})
