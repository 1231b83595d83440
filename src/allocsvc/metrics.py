"""Prometheus metrics, read from the service's own counters at scrape time.

Nothing is counted twice on the hot path: a collector reads the counters the service keeps
anyway (cascade usage, write-behind statistics, store health, alerts) when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from allocsvc.allocation.service import AllocationService
from allocsvc.analytics import Alert


class ServiceCollector(Collector):
    def __init__(
        self,
        service: AllocationService,
        store_health: Callable[[], dict[str, bool]],
        write_behind: Callable[[], dict[str, float]],
        alerts: Callable[[], Iterable[tuple[str, Alert]]],
    ) -> None:
        self._service = service
        self._store_health = store_health
        self._write_behind = write_behind
        self._alerts = alerts

    def collect(self) -> Iterable[Metric]:
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
        for experiment in self._service.list_experiments():
            for level, (a, c) in self._service.cascade_counts(experiment.handle).items():
                allocations.add_metric([experiment.key, str(level)], a)
                conversions.add_metric([experiment.key, str(level)], c)
        yield allocations
        yield conversions
        up = GaugeMetricFamily(
            "allocsvc_store_up", "Whether a store is reachable", labels=["store"]
        )
        for store, healthy in self._store_health().items():
            up.add_metric([store], 1.0 if healthy else 0.0)
        yield up
        for name, value in self._write_behind().items():
            yield GaugeMetricFamily(f"allocsvc_writebehind_{name}", f"Write-behind {name}", value)
        alerts = GaugeMetricFamily(
            "allocsvc_alerts", "Open alerts by experiment and kind", labels=["experiment", "kind"]
        )
        counted: dict[tuple[str, str], int] = {}
        for experiment_key, alert in self._alerts():
            slot = (experiment_key, str(alert.kind))
            counted[slot] = counted.get(slot, 0) + 1
        for (experiment_key, kind), n in counted.items():
            alerts.add_metric([experiment_key, kind], n)
        yield alerts


def serve_metrics(port: int, host: str, collector: ServiceCollector) -> CollectorRegistry:
    """Expose the collector (and nothing else) on http://host:port/metrics."""
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(port, addr=host, registry=registry)
    return registry
