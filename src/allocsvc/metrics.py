"""Prometheus metrics, from an immutable snapshot that the event loop publishes.

Nothing is counted twice on the hot path, and the HTTP server's threads never touch the
service (which is not thread-safe): a job on the event loop (`allocsvc.tasks.metrics_snapshot`)
reads the counters the service keeps anyway (cascade usage, write-behind statistics, store
health, alerts) into a `MetricsSnapshot` every second, and the collector serves the latest one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from allocsvc.dashboard import DashboardData
from allocsvc.dashboard.http import DashboardApp
from allocsvc.dashboard.http import serve as serve_http
from allocsvc.learning.service import JobMetrics

# The held store's statistics (`AllocationService.held_statistics`) as metrics
# `allocsvc_held_<name>`; those named in HELD_COUNTERS are counters (`_total`).
HELD_HELP = {
    "assignments": "Assignments held in memory",
    "capacity": "The most assignments memory holds (max_held_assignments; 0: no bound)",
    "evictions": "Assignments evicted from memory (it was full)",
    "evicted_filter_bytes": "Bytes of the filter of evicted (experiment, user) keys",
    "evicted_filter_full": "1 when that filter is full: every user not held is looked up",
    "unlisted_experiments": "Experiments whose stored users a restart has still to list",
    "store_lookups": "Users and assignment ids looked up in PostgreSQL, as maybe not held",
    "store_lookups_found": "Of those lookups, the ones PostgreSQL had",
}
HELD_COUNTERS = frozenset({"evictions", "store_lookups", "store_lookups_found"})
# Shared state's statistics (`RedisShared.statistics`), as allocsvc_redis_<name>.
SHARED_HELP = {
    "pending_records": "Records of new assignments waiting for the next push to Redis",
    "dropped_records": "Records of new assignments dropped unpushed (Redis behind or down)",
}
SHARED_COUNTERS = frozenset({"dropped_records"})


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The numbers of one moment. `cascade`: (experiment, level, allocations, conversions);
    `stores`: (store, reachable); `write_behind`: (statistic, value); `held`: the held
    store's (statistic, value), `AllocationService.held_statistics`; `shared`: shared state's
    (statistic, value), `RedisShared.statistics`; `alerts`: (experiment, kind, open
    alerts)."""

    taken_ms: int = 0
    cascade: tuple[tuple[str, int, int, int], ...] = ()
    stores: tuple[tuple[str, bool], ...] = ()
    write_behind: tuple[tuple[str, float], ...] = ()
    held: tuple[tuple[str, int], ...] = ()
    shared: tuple[tuple[str, float], ...] = ()
    alerts: tuple[tuple[str, str, int], ...] = ()


class ServiceCollector(Collector):
    """Serves `latest()`, an immutable snapshot: safe from any thread."""

    def __init__(self, latest: Callable[[], MetricsSnapshot]) -> None:
        self._latest = latest

    def collect(self) -> Iterable[Metric]:
        snapshot = self._latest()
        allocations = CounterMetricFamily(
            "allocsvc_allocations",
            "Allocations decided, by experiment and cascade level used (0 = global)",
            labels=["experiment", "level"],
        )
        conversions = CounterMetricFamily(
            "allocsvc_conversions",
            "Conversions counted, by experiment and cascade level of their assignment",
            labels=["experiment", "level"],
        )
        for key, level, a, c in snapshot.cascade:
            allocations.add_metric([key, str(level)], a)
            conversions.add_metric([key, str(level)], c)
        yield allocations
        yield conversions
        up = GaugeMetricFamily(
            "allocsvc_store_up", "Whether a store is reachable", labels=["store"]
        )
        for store, healthy in snapshot.stores:
            up.add_metric([store], 1.0 if healthy else 0.0)
        yield up
        for name, value in snapshot.write_behind:
            yield GaugeMetricFamily(f"allocsvc_writebehind_{name}", f"Write-behind {name}", value)
        for name, value in snapshot.held:
            family = CounterMetricFamily if name in HELD_COUNTERS else GaugeMetricFamily
            yield family(f"allocsvc_held_{name}", HELD_HELP[name], value)
        for name, value in snapshot.shared:
            family = CounterMetricFamily if name in SHARED_COUNTERS else GaugeMetricFamily
            yield family(f"allocsvc_redis_{name}", SHARED_HELP[name], value)
        alerts = GaugeMetricFamily(
            "allocsvc_alerts", "Open alerts by experiment and kind", labels=["experiment", "kind"]
        )
        for key, kind, n in snapshot.alerts:
            alerts.add_metric([key, kind], n)
        yield alerts
        yield GaugeMetricFamily(
            "allocsvc_metrics_snapshot_timestamp_seconds",
            "When the numbers above were read from the service (Unix seconds)",
            snapshot.taken_ms / 1000.0,
        )


class LearningJobsCollector(Collector):
    """Training jobs (clustering, embeddings) of this process, from `jobs()`: a
    `allocsvc.learning.service.JobMetrics`, replaced (never mutated) by the event loop, so
    reading it from the HTTP server's threads is safe."""

    def __init__(self, jobs: Callable[[], JobMetrics]) -> None:
        self._jobs = jobs

    def collect(self) -> Iterable[Metric]:
        jobs = self._jobs()
        started = CounterMetricFamily(
            "allocsvc_learning_jobs_started", "Training jobs started, by kind", labels=["kind"]
        )
        for kind, n in sorted(jobs.started.items()):
            started.add_metric([kind], n)
        yield started
        finished = CounterMetricFamily(
            "allocsvc_learning_jobs_finished",
            "Training jobs finished, by kind and outcome (succeeded, rejected, failed)",
            labels=["kind", "state"],
        )
        failed = CounterMetricFamily(
            "allocsvc_learning_jobs_failed", "Training jobs that failed, by kind", labels=["kind"]
        )
        failures: dict[str, int] = {}
        for (kind, state), n in sorted(jobs.finished.items()):
            finished.add_metric([kind, state], n)
            if state == "failed":
                failures[kind] = n
        for kind in sorted(jobs.started):
            failed.add_metric([kind], failures.get(kind, 0))
        yield finished
        yield failed
        running = GaugeMetricFamily(
            "allocsvc_learning_jobs_running", "Training jobs running now, by kind", labels=["kind"]
        )
        for kind, n in sorted(jobs.running.items()):
            running.add_metric([kind], n)
        yield running
        duration = GaugeMetricFamily(
            "allocsvc_learning_job_last_duration_seconds",
            "Wall time of the last finished training job, by kind",
            labels=["kind"],
        )
        for kind, seconds in sorted(jobs.last_duration_s.items()):
            duration.add_metric([kind], seconds)
        yield duration


def serve_metrics(
    port: int,
    host: str,
    collector: ServiceCollector,
    *more: Collector,
    dashboard: DashboardData | None = None,
) -> CollectorRegistry:
    """Expose the collectors on http://host:port/metrics and, when given, the read-only
    dashboard on / and /api/ of the same port. Call it from the server's event loop: the
    dashboard reads the service there."""
    registry = CollectorRegistry()
    registry.register(collector)
    for other in more:
        registry.register(other)
    serve_http(host, port, DashboardApp(dashboard, asyncio.get_running_loop(), registry))
    return registry
