"""Allocation share over time: a bounded series of per-variant allocation totals."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SharePoint:
    """Cumulative allocations per variant (in the experiment's variant order) at `at_ms`."""

    at_ms: int
    allocations: tuple[int, ...]


class ShareHistory:
    """The last `points` samples per experiment, taken every `interval` seconds by the
    scheduler. Shares are computed per interval (allocations made between two samples), so
    the chart shows how the policy's split moves as it learns, not the cumulative average."""

    def __init__(self, points: int, clock: Callable[[], float] = time.time) -> None:
        self._points = points
        self._clock = clock
        self._series: dict[str, deque[SharePoint]] = {}

    def record(self, experiment_key: str, allocations: Sequence[int]) -> None:
        series = self._series.setdefault(experiment_key, deque(maxlen=self._points))
        point = SharePoint(int(self._clock() * 1000), tuple(allocations))
        if series and len(series[-1].allocations) != len(point.allocations):
            series.clear()  # the variants changed (a draft was edited): start over
        series.append(point)

    def points(self, experiment_key: str) -> list[SharePoint]:
        return list(self._series.get(experiment_key, ()))

    def shares(self, experiment_key: str) -> list[tuple[int, tuple[float, ...]]]:
        """(time, share per variant) of the allocations made in each interval; intervals
        without allocations are left out."""
        pts = self.points(experiment_key)
        out = []
        for before, after in itertools.pairwise(pts):
            made = [
                max(b - a, 0) for a, b in zip(before.allocations, after.allocations, strict=True)
            ]
            total = sum(made)
            if total > 0:
                out.append((after.at_ms, tuple(m / total for m in made)))
        return out
