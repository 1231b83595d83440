"""Which allocations feed learning: about one in `every`, at random.

Unary calls: the allocation service keeps a countdown and observes a request when it reaches
zero, so an allocation that is not observed costs one decrement. Gaps are drawn uniformly from
1..2·every−1 (mean `every`): a fixed stride could keep seeing the same slot of periodic
traffic (e.g. every tenth request of a client that cycles through ten contexts).

Batches: about items / every items at random positions, at most a cap per batch, drawn at once
(walking the gaps through a 1,000-item batch cost more than the batch's own Python work).
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

    def sample(self, items: int, at_most: int) -> list[int]:
        """Positions (ascending) observed among a batch's `items`: items / every of them, the
        count rounded up or down at random so that its mean is exact, at most `at_most`."""
        count = min(at_most, int(items / self.every + self._rng.random()))
        return sorted(self._rng.sample(range(items), count))
