"""Which allocations feed learning: about one in `every`, at random gaps.

The allocation service keeps a countdown and observes a request when it reaches zero, so an
allocation that is not observed costs one decrement. Gaps are drawn uniformly from
1..2·every−1 (mean `every`): a fixed stride could keep seeing the same slot of periodic
traffic (e.g. every tenth request of a client that cycles through ten contexts).
"""

from __future__ import annotations

import random


class ObservationGaps:
    """Gaps between observed allocations (mean `every`; always 1 when `every` is 1)."""

    def __init__(self, every: int, seed: int = 0) -> None:
        if every < 1:
            raise ValueError("every: must be at least 1")
        self.every = every
        self._rng = random.Random(seed)

    def next(self) -> int:
        if self.every == 1:
            return 1
        return self._rng.randint(1, 2 * self.every - 1)

    def positions(self, countdown: int, items: int) -> tuple[list[int], int]:
        """Positions observed among the next `items` requests when the countdown stands at
        `countdown` (requests until the next observed one, at least 1), and the countdown
        after them: the same positions as counting the requests down one by one."""
        chosen = []
        position = countdown - 1
        while position < items:
            chosen.append(position)
            position += self.next()
        return chosen, position - items + 1
