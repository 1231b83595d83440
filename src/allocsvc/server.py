"""The gRPC server: wiring, health, reflection, graceful shutdown, worker processes."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import multiprocessing
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from allocsvc import core, logs
from allocsvc.allocation.experiments import SegmentationDefaults
from allocsvc.allocation.insights import Insights
from allocsvc.allocation.journal import Journal, MemoryJournal
from allocsvc.allocation.service import AllocationService, Limits
from allocsvc.api import SERVICE_NAMES, add_services, reflection
from allocsvc.api.auth import AuthInterceptor
from allocsvc.api.registration import GenericOnly, ServerGroup
from allocsvc.api.telemetry import RpcMetrics, TelemetryInterceptor, start_serving
from allocsvc.config import Settings
from allocsvc.context import ContextLimits, Extractor
from allocsvc.dashboard import DashboardData, ShareHistory
from allocsvc.learning.service import Learning, build_learning
from allocsvc.metrics import LearningJobsCollector, ServiceCollector, serve_metrics
from allocsvc.regions import stores as regions_setup
from allocsvc.regions.router import Regions
from allocsvc.steering import STEER_INTERVAL_S, Steering, WorkerSlot
from allocsvc.store import EmbeddedPostgres, PostgresStore, migrate
from allocsvc.store.pump import DeltaPump
from allocsvc.store.redis import RedisShared
from allocsvc.store.writebehind import PostgresJournal
from allocsvc.tasks import Scheduler
from allocsvc.tasks.metrics_snapshot import SNAPSHOT_INTERVAL_S, MetricsPublisher

log = logging.getLogger(__name__)
# Health service name that reports whether the shared Redis is reachable.
REDIS_HEALTH = "allocsvc.store.redis"
# Seconds between copies of the home region's experiments to the other regions.
REGION_EXPERIMENTS_S = 0.25
# Pause between two growth checks of the segment trees (each waits to be woken, see
# `Insights.rebuild_grown_on_wake`): bounds how often trees are rebuilt under heavy traffic.
GROWTH_PAUSE_S = 0.05
# A listing of stored users that failed (PostgreSQL away) is tried again after this long.
LIST_RETRY_S = 30.0
# How often a process with bounded memory of assignments checks whether its filter of evicted
# users is full (then renews it from the stored users: `AllocationService.renew_evicted_filter`).
FILTER_CHECK_S = 5.0


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
    regions: Regions | None = None
    learning: Learning | None = None


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
        # An evicted assignment must have left the write-behind buffer (it is read back from
        # PostgreSQL), hence at least twice the buffer's bound.
        max_held_assignments=settings.max_held_assignments
        and max(settings.max_held_assignments, 2 * settings.backpressure.max_pending_assignments),
    )
    contextual, hierarchy = settings.contextual, settings.hierarchy
    defaults = SegmentationDefaults(
        contextual=contextual.enabled,
        context_features=contextual.context_features,
        min_samples_per_segment=contextual.min_samples_per_segment,
        hierarchy_levels=hierarchy.hierarchy_levels,
        max_depth=hierarchy.max_depth,
    )
    return AllocationService(
        core.Engine(), stores.journal, extractor, limits, stores.shared, defaults
    )


def start_embedded(settings: Settings) -> tuple[EmbeddedPostgres, str]:
    """Start the embedded PostgreSQL under settings.data_dir (blocking)."""
    embedded = EmbeddedPostgres(settings.data_dir / "postgres")
    dsn = embedded.start()
    log.info("embedded postgres started", extra={"data_dir": str(settings.data_dir)})
    return embedded, dsn


async def open_stores(settings: Settings, namespace: str = "allocsvc") -> Stores:
    shared = RedisShared(settings.redis_url, namespace=namespace) if settings.redis_url else None
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
    journal = PostgresJournal(
        store,
        flush_interval=settings.write_behind_interval,
        max_pending_assignments=settings.backpressure.max_pending_assignments,
        max_pending_conversions=settings.backpressure.max_pending_conversions,
        max_unexpanded_assignments=settings.backpressure.max_unexpanded_assignments,
    )
    return Stores(journal, store, embedded, shared)


def _grpc_server(settings: Settings, telemetry: TelemetryInterceptor) -> grpc.aio.Server:
    auth = AuthInterceptor(settings.auth)
    group = ServerGroup.sharing(
        settings.accept_loops,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            *_connection_age(settings.max_connection_age),
        ],
        max_waiting_calls=settings.backpressure.max_waiting_calls,
        max_in_flight_rpcs=settings.backpressure.max_in_flight_rpcs,
        # Telemetry outermost, so that refusals are counted and carry request ids too. With
        # no auth, telemetry wraps the handlers as they are registered (see `start`):
        # no interceptor then runs per call.
        interceptors=None if auth.open else [telemetry, auth],
    )
    # Generic handlers only: one outstanding request-call task per server, not one per method.
    return GenericOnly(group)


def _connection_age(seconds: float) -> list[tuple[str, int]]:
    """gRPC's options for `max_connection_age` (none for 0: connections live until closed)."""
    return [] if seconds == 0 else [("grpc.max_connection_age_ms", max(1, round(seconds * 1000)))]


def _listen(server: grpc.aio.Server, settings: Settings) -> int:
    address = f"{settings.host}:{settings.port}"
    tls = settings.tls
    if not tls.enabled or tls.cert_file is None or tls.key_file is None:
        return server.add_insecure_port(address)
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file is not None else None
    credentials = grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    return server.add_secure_port(address, credentials)


async def _listen_in_turn(
    server: grpc.aio.Server, settings: Settings, slot: WorkerSlot | None
) -> int:
    """Bind, a `--workers` worker only once the one before it has (steering names sockets by
    the order they bound in)."""
    if slot is None:
        return _listen(server, settings)
    await asyncio.to_thread(slot.my_turn)
    port = 0
    try:
        port = _listen(server, settings)
    finally:
        slot.bound(port)  # 0: failed, and the next worker need not wait for this one
    return port


async def start(settings: Settings, slot: WorkerSlot | None = None) -> Running:
    """Serve on settings.host:settings.port (port 0 picks a free port): health and every RPC
    answer NOT_SERVING / UNAVAILABLE until the state is loaded, then SERVING."""
    if settings.seed is not None:
        core.seed_rng(settings.seed)
    if settings.auth.pseudonym_secret is not None:
        logs.set_pseudonym_key(settings.auth.pseudonym_secret.get_secret_value().encode())
    Extractor.warm_up()
    stores = await open_stores(*regions_setup.home_settings(settings))
    service = build_service(stores, settings)
    learning = build_learning(
        settings.clustering, settings.embeddings, stores.store.pool if stores.store else None
    )
    service.attach_learning(learning)
    saved = await regions_setup.saved_regions(stores)
    other_regions = await regions_setup.open_other_regions(
        settings, open_stores, build_service, saved
    )
    regions = regions_setup.build_regions(
        settings, (stores, service), other_regions, learning, saved
    )
    erasures = [r.erasures for r in regions.runtimes.values() if r.erasures is not None]
    for follower in erasures:
        # Before the state is loaded: an erasure committed later is applied by a poll.
        await follower.start()
    health_servicer = health.HealthServicer()
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    rpc_metrics = RpcMetrics() if settings.metrics_port is not None else None
    telemetry = TelemetryInterceptor(rpc_metrics, gated=SERVICE_NAMES)
    server = _grpc_server(settings, telemetry)
    insights = Insights(
        service,
        stores.journal,
        window_days=settings.eligibility_window_days,
        first_rebuild_at=settings.hierarchy.first_rebuild_at,
        growth_check_interval=settings.hierarchy.growth_check_interval,
        deployed_model=learning.deployed_model,
    )
    if _trees_rebuilt(settings):
        # Trees come on their own: until its first one, an experiment is served globally.
        service.global_until_first_tree()
    if _trees_grow(settings):
        # Growth rebuilds follow the allocations (a tenth of the first tree's allocations).
        every = max(1, settings.hierarchy.first_rebuild_at // 10)
        service.on_growth(insights.wake_growth, every)
    registering = telemetry.registering(server) if AuthInterceptor(settings.auth).open else server
    add_services(registering, service, insights, regions.map.default, regions, learning)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(server, (*SERVICE_NAMES, health.SERVICE_NAME))
    port = await _listen_in_turn(server, settings, slot)
    await start_serving(server)
    log.info("listening", extra={"host": settings.host, "port": port, "tls": settings.tls.enabled})
    try:
        await _load_state(stores, service, health_servicer)
        for other_stores, other_service in other_regions.values():
            await _load_state(other_stores, other_service, health_servicer)
        if _trees_rebuilt(settings):
            # Restored experiments get their trees back (built from the restored counts).
            await insights.rebuild_restored()
    except BaseException:
        await server.stop(0)
        raise
    telemetry.ready = True
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # The dashboard lives on the metrics port, so it needs one.
    dashboard = (
        DashboardData(service, insights, ShareHistory(settings.dashboard.history_points))
        if settings.dashboard.enabled and settings.metrics_port is not None
        else None
    )
    publisher = None
    if settings.metrics_port is not None:
        # The HTTP threads read only the snapshot this publisher refreshes on the event loop.
        publisher = MetricsPublisher(
            service,
            lambda: _store_health(stores),
            lambda: _write_behind_stats(stores),
            lambda: [(k, a) for k, alerts in insights.alerts.items() for a in alerts],
            dict if stores.shared is None else stores.shared.statistics,
        )
        await publisher.publish()
        serve_metrics(
            settings.metrics_port,
            settings.host,
            ServiceCollector(lambda: publisher.latest),
            LearningJobsCollector(lambda: learning.job_metrics),
            *([rpc_metrics] if rpc_metrics is not None else []),
            dashboard=dashboard,
        )
    await learning.load()
    scheduler = Scheduler()
    if slot is not None:
        scheduler.every("steering", STEER_INTERVAL_S, slot.tick)
    if publisher is not None:
        scheduler.every("metrics-snapshot", SNAPSHOT_INTERVAL_S, publisher.publish)
    scheduler.every("learning", settings.clustering.drift_interval, learning.check)
    # A model trained and deployed on another replica serves here within this interval.
    scheduler.every("learning-models", settings.clustering.model_poll_interval, learning.poll)
    scheduler.every("eligibility", settings.eligibility_interval, insights.run_eligibility_checks)
    if settings.hierarchy.enabled:
        scheduler.every("tree-rebuild", settings.tree_rebuild_interval, insights.rebuild_all)
        if _trees_grow(settings):
            pause = GROWTH_PAUSE_S
            scheduler.every("tree-rebuild-growth", pause, insights.rebuild_grown_on_wake)
    if dashboard is not None:
        interval = settings.dashboard.history_interval
        scheduler.every("dashboard-history", interval, dashboard.sample_history)
    for follower in erasures:
        # Other processes' erasures of the region reach this process's memory.
        interval = settings.erasure.poll_interval
        scheduler.every(f"erasures-{follower.region}", interval, follower.poll)
    if regions.multi:
        scheduler.every("region-experiments", REGION_EXPERIMENTS_S, regions.replicate_experiments)
        scheduler.every("region-sync", settings.regions.sync_interval, _sync(regions))
    for region_stores, region_service in ((stores, service), *other_regions.values()):
        journal = region_stores.journal
        if isinstance(journal, PostgresJournal) and region_service.unlisted_experiments:
            listing = functools.partial(region_service.list_stored_users, journal.list_users)
            scheduler.once("list-stored-users", listing, retry=LIST_RETRY_S)
        if isinstance(journal, PostgresJournal) and region_service.held_capacity:
            renewal = functools.partial(region_service.renew_evicted_filter, journal)
            scheduler.every("renew-evicted-filter", FILTER_CHECK_S, renewal)
    log.info("serving", extra={"host": settings.host, "port": port, "pid": os.getpid()})
    return Running(server, health_servicer, service, stores, scheduler, port, regions, learning)


def _trees_grow(settings: Settings) -> bool:
    """Whether segment trees are rebuilt as allocations grow."""
    tree = settings.hierarchy
    return tree.enabled and tree.first_rebuild_at > 0 and tree.growth_check_interval > 0


def _trees_rebuilt(settings: Settings) -> bool:
    """Whether segment trees are rebuilt without anyone asking (periodically or by growth)."""
    return _trees_grow(settings) or (
        settings.hierarchy.enabled and settings.tree_rebuild_interval > 0
    )


def _sync(regions: Regions) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        report = await regions.sync()
        log.info("regions synced", extra={"published": report.published, "failed": report.failed})

    return run


async def restore(journal: PostgresJournal, service: AllocationService) -> dict[str, int]:
    """Install the state stored in PostgreSQL: experiments, counters, segments, and the
    assignments memory holds (at most `held_capacity` of them, read in chunks: the table may
    hold far more than a process could). What was read, by kind."""
    experiments, counts, segments = await journal.load()
    service.restore(experiments, counts, [], segments)
    # Experiments with rows not read have their users listed in the background
    # (`AllocationService.list_stored_users`); until then each user of theirs not held is
    # looked up in PostgreSQL.
    restored = await journal.hold_newest(experiments, service.held_capacity, service)
    return {
        "experiments": len(experiments),
        "counters": len(counts),
        "assignments": restored.held,
        "unread": len(restored.unread),
        "blocks": restored.blocks,
        "block_assignments": restored.block_rows,
    }


async def _load_state(
    stores: Stores, service: AllocationService, health_servicer: health.HealthServicer
) -> None:
    """Restore the posterior state from the stores and connect the sinks of its changes."""
    # Every change of the counters goes once to each sink that persists or shares it.
    pump = DeltaPump(service.take_deltas)
    if isinstance(stores.journal, PostgresJournal):
        loaded = await restore(stores.journal, service)
        pump.add_sink("postgres")
        stores.journal.bind_deltas(lambda: pump.drain("postgres"))
        stores.journal.start(service.load_experiments)
        log.info("state loaded", extra=loaded)
    if stores.shared is not None:

        def report(healthy: bool) -> None:
            status = health_pb2.HealthCheckResponse
            health_servicer.set(REDIS_HEALTH, status.SERVING if healthy else status.NOT_SERVING)

        stores.shared.bind(
            pump,
            service.replace_counts,
            service.own_snapshot,
            service.experiment_handles,
            report,
        )
        report(True)
        stores.shared.start()


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
        "refused": float(s.refused),
        "dropped": float(s.dropped),
        "unexpanded_assignments": float(s.unexpanded_assignments),
        "lookup_rounds": float(stores.journal.lookup_rounds),
    }


async def stop(running: Running, grace: float) -> None:
    """Health NOT_SERVING, stop accepting, finish in-flight RPCs within `grace`, flush. Each
    step is logged as it begins, so that a stop that does not end names the step it is in
    (SIGUSR1 then logs where each task waits: `dump_tasks`)."""
    running.health.enter_graceful_shutdown()
    log.info("stopping", extra={"step": "rpcs"})
    await running.server.stop(grace)
    log.info("stopping", extra={"step": "background jobs"})
    await running.scheduler.stop()
    if running.learning is not None:
        log.info("stopping", extra={"step": "learning"})
        await running.learning.close()
    if running.regions is not None:
        log.info("stopping", extra={"step": "regions"})
        await running.regions.close()
    log.info("stopping", extra={"step": "stores (the last flush)"})
    await running.stores.close()
    log.info("stopped", extra={"pid": os.getpid()})


def dump_tasks() -> None:
    """Log every asyncio task of this loop with the stack it waits in (on SIGUSR1): what to
    read when the server does not answer or does not stop. A last line, "tasks logged", says
    the list is whole."""
    tasks = asyncio.all_tasks()
    for task in tasks:
        log.warning("task", extra={"task": task.get_name(), "awaiting": _await_chain(task)})
    log.warning("tasks logged", extra={"tasks": len(tasks)})


def _await_chain(task: asyncio.Task[Any]) -> list[str]:
    """Where a task waits: its coroutine and each one it awaits, outermost first (Task's own
    stack shows the outermost only)."""
    chain = []
    at: Any = task.get_coro()
    while at is not None:
        frame = getattr(at, "cr_frame", None) or getattr(at, "gi_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        at = getattr(at, "cr_await", None) or getattr(at, "gi_yieldfrom", None)
    return chain


async def serve_until_signalled(settings: Settings, slot: WorkerSlot | None = None) -> None:
    running = await start(settings, slot)
    if settings.gc.freeze_after_start:
        # This process only serves from now on: what start-up made lives as long as it does.
        gc.collect()
        gc.freeze()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    await stopping.wait()
    log.info("shutting down", extra={"grace_seconds": settings.grace_seconds})
    await stop(running, settings.grace_seconds)


def _serve(settings: Settings, slot: WorkerSlot | None = None) -> None:
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(serve_until_signalled(settings, slot))
    else:
        asyncio.run(serve_until_signalled(settings, slot))


def _worker(settings: Settings, slot: WorkerSlot | None) -> None:
    logs.configure(settings.log_level)
    _serve(settings, slot)


def run(settings: Settings) -> int:
    """Serve in this process, or in `settings.workers` processes sharing the port."""
    logs.configure(settings.log_level)
    if settings.workers == 1:
        _serve(settings)
        return 0
    if settings.port == 0:
        raise ValueError("port: --workers > 1 needs a fixed port to share")
    embedded = None
    if not settings.in_memory and settings.postgres_dsn is None:
        # One embedded PostgreSQL for all workers, owned by this parent process.
        embedded, dsn = start_embedded(settings)
        settings = settings.model_copy(update={"postgres_dsn": dsn})
    ctx = multiprocessing.get_context("spawn")
    steering = (
        Steering.for_workers(ctx, settings.workers)
        if settings.steer_connections and Steering.supported()
        else None
    )
    # Each worker serves its own metrics, on metrics_port + its index.
    workers = [
        ctx.Process(
            target=_worker,
            args=(
                settings
                if settings.metrics_port is None
                else settings.model_copy(update={"metrics_port": settings.metrics_port + i}),
                None if steering is None else WorkerSlot(steering, i, settings.accept_loops),
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
