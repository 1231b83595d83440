"""The gRPC server: wiring, health, reflection, graceful shutdown, worker processes."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from allocsvc import core, logs
from allocsvc.allocation.insights import Insights
from allocsvc.allocation.journal import Journal, MemoryJournal
from allocsvc.allocation.service import AllocationService, Limits
from allocsvc.api import SERVICE_NAMES, add_services, reflection
from allocsvc.config import Settings
from allocsvc.context import ContextLimits, Extractor
from allocsvc.metrics import ServiceCollector, serve_metrics
from allocsvc.store import EmbeddedPostgres, PostgresStore, migrate
from allocsvc.store.pump import DeltaPump
from allocsvc.store.redis import RedisShared
from allocsvc.store.writebehind import PostgresJournal
from allocsvc.tasks import Scheduler

log = logging.getLogger(__name__)
# Health service name that reports whether the shared Redis is reachable.
REDIS_HEALTH = "allocsvc.store.redis"


@dataclass
class Stores:
    """The journal and what backs it; closed in reverse order of opening."""

    journal: Journal
    store: PostgresStore | None = None
    embedded: EmbeddedPostgres | None = None
    shared: RedisShared | None = None

    async def close(self) -> None:
        if isinstance(self.journal, PostgresJournal):
            await self.journal.close()
        if self.shared is not None:
            await self.shared.close()
        if self.store is not None:
            await self.store.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


@dataclass
class Running:
    """A started server and what it needs to stop cleanly."""

    server: grpc.aio.Server
    health: health.HealthServicer
    service: AllocationService
    stores: Stores
    scheduler: Scheduler
    port: int


def build_service(stores: Stores, settings: Settings) -> AllocationService:
    extractor = Extractor(
        ContextLimits(
            max_context_entries=settings.max_context_entries,
            max_key_chars=settings.max_context_key_chars,
            max_value_chars=settings.max_context_value_chars,
        ),
        ua_cache_size=settings.user_agent_cache_size,
    )
    limits = Limits(
        max_variants=settings.max_variants,
        max_batch_items=settings.max_batch_items,
        max_user_id_chars=settings.max_user_id_chars,
    )
    return AllocationService(core.Engine(), stores.journal, extractor, limits, stores.shared)


def start_embedded(settings: Settings) -> tuple[EmbeddedPostgres, str]:
    """Start the embedded PostgreSQL under settings.data_dir (blocking)."""
    embedded = EmbeddedPostgres(settings.data_dir / "postgres")
    dsn = embedded.start()
    log.info("embedded postgres started", extra={"data_dir": str(settings.data_dir)})
    return embedded, dsn


async def open_stores(settings: Settings) -> Stores:
    shared = RedisShared(settings.redis_url) if settings.redis_url else None
    if settings.in_memory:
        return Stores(MemoryJournal(), shared=shared)
    embedded = None
    if settings.postgres_dsn is None:
        embedded, dsn = await asyncio.to_thread(start_embedded, settings)
    else:
        dsn = settings.postgres_dsn
    if settings.migrate:
        applied = await migrate(dsn)
        if applied:
            log.info("migrations applied", extra={"migrations": applied})
    store = await PostgresStore.connect(dsn, min_size=2, max_size=8)
    return Stores(PostgresJournal(store), store, embedded, shared)


async def start(settings: Settings) -> Running:
    """Load state, then serve on settings.host:settings.port (port 0 picks a free port)."""
    if settings.seed is not None:
        core.seed_rng(settings.seed)
    Extractor.warm_up()
    stores = await open_stores(settings)
    service = build_service(stores, settings)
    health_servicer = health.HealthServicer()
    # Every change of the counters goes once to each sink that persists or shares it.
    pump = DeltaPump(service.take_deltas)
    if isinstance(stores.journal, PostgresJournal):
        experiments, counts, assignments, segments = await stores.journal.load()
        service.restore(experiments, counts, assignments, segments)
        pump.add_sink("postgres")
        stores.journal.bind_deltas(lambda: pump.drain("postgres"))
        stores.journal.start(service.load_experiments)
        log.info(
            "state loaded",
            extra={
                "experiments": len(experiments),
                "counters": len(counts),
                "assignments": len(assignments),
            },
        )
    if stores.shared is not None:

        def report(healthy: bool) -> None:
            status = health_pb2.HealthCheckResponse
            health_servicer.set(REDIS_HEALTH, status.SERVING if healthy else status.NOT_SERVING)

        stores.shared.bind(
            pump,
            service.replace_counts,
            service.snapshot,
            service.experiment_handles,
            report,
        )
        report(True)
        stores.shared.start()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 1),
        ]
    )
    insights = Insights(service, stores.journal, window_days=settings.eligibility_window_days)
    add_services(server, service, insights, settings.region)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(server, (*SERVICE_NAMES, health.SERVICE_NAME))
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if settings.metrics_port is not None:
        serve_metrics(
            settings.metrics_port,
            settings.host,
            ServiceCollector(
                service,
                lambda: _store_health(stores),
                lambda: _write_behind_stats(stores),
                lambda: [(k, a) for k, alerts in insights.alerts.items() for a in alerts],
            ),
        )
    scheduler = Scheduler()
    scheduler.every("eligibility", settings.eligibility_interval, insights.run_eligibility_checks)
    scheduler.every("tree-rebuild", settings.tree_rebuild_interval, insights.rebuild_all)
    log.info("serving", extra={"host": settings.host, "port": port, "pid": os.getpid()})
    return Running(server, health_servicer, service, stores, scheduler, port)


def _store_health(stores: Stores) -> dict[str, bool]:
    health_of: dict[str, bool] = {}
    if stores.shared is not None:
        health_of["redis"] = stores.shared.healthy
    if isinstance(stores.journal, PostgresJournal):
        health_of["postgres"] = stores.journal.healthy
    return health_of


def _write_behind_stats(stores: Stores) -> dict[str, float]:
    if not isinstance(stores.journal, PostgresJournal):
        return {}
    s = stores.journal.stats
    return {
        "pending_assignments": float(s.pending_assignments),
        "last_flush_lag_ms": s.last_flush_lag_ms,
        "flush_failures": float(s.failures),
        "conversions_written": float(s.conversions_written),
    }


async def stop(running: Running, grace: float) -> None:
    """Health NOT_SERVING, stop accepting, finish in-flight RPCs within `grace`, flush."""
    running.health.enter_graceful_shutdown()
    await running.server.stop(grace)
    await running.scheduler.stop()
    await running.stores.close()
    log.info("stopped", extra={"pid": os.getpid()})


async def serve_until_signalled(settings: Settings) -> None:
    running = await start(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down", extra={"grace_seconds": settings.grace_seconds})
    await stop(running, settings.grace_seconds)


def _worker(settings: Settings) -> None:
    logs.configure(settings.log_level)
    asyncio.run(serve_until_signalled(settings))


def run(settings: Settings) -> int:
    """Serve in this process, or in `settings.workers` processes sharing the port."""
    logs.configure(settings.log_level)
    if settings.workers == 1:
        asyncio.run(serve_until_signalled(settings))
        return 0
    if settings.port == 0:
        raise ValueError("port: --workers > 1 needs a fixed port to share")
    embedded = None
    if not settings.in_memory and settings.postgres_dsn is None:
        # One embedded PostgreSQL for all workers, owned by this parent process.
        embedded, dsn = start_embedded(settings)
        settings = settings.model_copy(update={"postgres_dsn": dsn})
    ctx = multiprocessing.get_context("spawn")
    # Each worker serves its own metrics, on metrics_port + its index.
    workers = [
        ctx.Process(
            target=_worker,
            args=(
                settings
                if settings.metrics_port is None
                else settings.model_copy(update={"metrics_port": settings.metrics_port + i}),
            ),
        )
        for i in range(settings.workers)
    ]
    for w in workers:
        w.start()

    def forward(signum: int, _frame: object) -> None:
        for w in workers:
            if w.pid is not None and w.is_alive():
                os.kill(w.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for w in workers:
        w.join()
    if embedded is not None:
        embedded.stop()
    return max((w.exitcode or 0) for w in workers)
