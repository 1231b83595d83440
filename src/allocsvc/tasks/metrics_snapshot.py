"""The job that publishes the metrics snapshot (see `allocsvc.metrics`).

It runs on the event loop, the only place the allocation service and the stores' statistics
may be read; the result is immutable, so the HTTP server's threads read `latest` without a lock
(replacing one attribute is atomic).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable

from allocsvc.allocation.service import AllocationService
from allocsvc.analytics import Alert
from allocsvc.metrics import MetricsSnapshot

# Seconds between snapshots: the most a scrape lags behind the service.
SNAPSHOT_INTERVAL_S = 1.0


class MetricsPublisher:
    """`publish()` reads the numbers into `latest`; schedule it every SNAPSHOT_INTERVAL_S."""

    def __init__(
        self,
        service: AllocationService,
        store_health: Callable[[], dict[str, bool]],
        write_behind: Callable[[], dict[str, float]],
        alerts: Callable[[], Iterable[tuple[str, Alert]]],
        shared: Callable[[], dict[str, float]] = dict,
    ) -> None:
        self._service = service
        self._store_health = store_health
        self._write_behind = write_behind
        self._alerts = alerts
        self._shared = shared
        self.latest = MetricsSnapshot()

    def take(self) -> MetricsSnapshot:
        """The numbers now. Call it on the event loop."""
        service = self._service
        cascade = tuple(
            (experiment.key, level, a, c)
            for experiment in service.list_experiments()
            for level, (a, c) in service.cascade_counts(experiment.handle).items()
        )
        open_alerts = Counter((key, str(alert.kind)) for key, alert in self._alerts())
        return MetricsSnapshot(
            taken_ms=time.time_ns() // 1_000_000,
            cascade=cascade,
            stores=tuple(self._store_health().items()),
            write_behind=tuple(self._write_behind().items()),
            held=tuple(service.held_statistics().items()),
            shared=tuple(self._shared().items()),
            alerts=tuple((key, kind, n) for (key, kind), n in sorted(open_alerts.items())),
        )

    async def publish(self) -> None:
        self.latest = self.take()
