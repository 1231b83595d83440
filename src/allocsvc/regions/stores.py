"""Opening every region's stores and services at start (called by allocsvc.server).

No regions configured: one region named `settings.region` served by the server's own stores,
exactly as a single-region server always was. Otherwise the default region uses the server's
own stores unless it names its own, and every other region opens its own PostgreSQL and Redis
(under its own key namespace).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from allocsvc.allocation.service import AllocationService
from allocsvc.config import RegionSettings, Settings
from allocsvc.errors import InvalidRequest
from allocsvc.regions.erasures import ErasureFollower
from allocsvc.regions.gdpr import DataProtection, LearningData, LearningUserData
from allocsvc.regions.model import Region, RegionMap
from allocsvc.regions.router import RegionRuntime, Regions
from allocsvc.regions.sync import RegionCounts

if TYPE_CHECKING:
    from allocsvc.server import Stores

log = logging.getLogger(__name__)
OpenStores = Callable[[Settings, str], Awaitable["Stores"]]
BuildService = Callable[["Stores", Settings], AllocationService]


def region_of(s: RegionSettings) -> Region:
    return Region(
        code=s.code,
        name=s.name,
        countries=frozenset(c.strip().upper() for c in s.countries),
        postgres_dsn=s.postgres_dsn,
        redis_url=s.redis_url,
        redis_namespace=s.redis_namespace,
        gdpr=s.gdpr,
        failover_region=s.failover_region,
    )


def region_map(settings: Settings, saved: Sequence[Region] = ()) -> RegionMap:
    """The configured regions, plus those saved by UpsertRegion (`saved`). The config file
    wins for a code it names; a saved region without its own PostgreSQL, or inconsistent
    with the others (a country taken, an unknown failover region), is left out and logged."""
    configured = [region_of(r) for r in settings.regions.regions]
    if not configured:
        regions = RegionMap([Region(settings.region)])
    else:
        regions = RegionMap(configured, settings.regions.default_region)
    for region in saved:
        if region.code in regions.regions:
            continue
        if region.postgres_dsn is None:
            log.warning("saved region without postgres_dsn ignored", extra={"region": region.code})
            continue
        try:
            regions.upsert(region)
        except InvalidRequest as exc:
            log.warning("saved region ignored", extra={"region": region.code, "error": str(exc)})
    return regions


async def saved_regions(stores: Stores) -> list[Region]:
    """Regions saved by UpsertRegion in the home region's PostgreSQL (none without one)."""
    from allocsvc.store.regioncounts import load_regions

    return [] if stores.store is None else await load_regions(stores.store)


def namespace(region: Region) -> str:
    return region.redis_namespace or f"allocsvc-{region.code}"


def home_settings(settings: Settings) -> tuple[Settings, str]:
    """Settings and Redis namespace of the home (default) region's stores."""
    if not settings.regions.regions:
        return settings, "allocsvc"
    home = region_map(settings).regions[region_map(settings).default]
    update: dict[str, Any] = {}
    if home.postgres_dsn:
        update["postgres_dsn"] = home.postgres_dsn
    if home.redis_url:
        update["redis_url"] = home.redis_url
    return settings.model_copy(update=update), namespace(home)


async def open_other_regions(
    settings: Settings,
    open_stores: OpenStores,
    build_service: BuildService,
    saved: Sequence[Region] = (),
) -> dict[str, tuple[Stores, AllocationService]]:
    """Stores and service of every region but the home one."""
    regions = region_map(settings, saved)
    opened: dict[str, tuple[Stores, AllocationService]] = {}
    for code, region in regions.regions.items():
        if code == regions.default:
            continue
        if region.postgres_dsn is None and not settings.in_memory:
            raise ValueError(f"regions: region {code!r} needs its own postgres_dsn")
        own = settings.model_copy(
            update={"postgres_dsn": region.postgres_dsn, "redis_url": region.redis_url}
        )
        stores = await open_stores(own, namespace(region))
        opened[code] = (stores, build_service(stores, own))
    return opened


def build_regions(
    settings: Settings,
    home: tuple[Stores, AllocationService],
    others: Mapping[str, tuple[Stores, AllocationService]],
    learning: LearningData | None = None,
    saved: Sequence[Region] = (),
) -> Regions:
    """Every region's runtime. `learning` (fed by the home region's traffic only) is one more
    source of the home region's personal data."""
    from allocsvc.store.erasurelog import PostgresErasureLog
    from allocsvc.store.regioncounts import PostgresRegionCounts, save_region
    from allocsvc.store.userdata import PostgresUserData, RedisUserData
    from allocsvc.store.writebehind import PostgresJournal

    regions = region_map(settings, saved)
    runtimes: dict[str, RegionRuntime] = {}
    for code, (stores, service) in {regions.default: home, **others}.items():
        protection = DataProtection(code, service, stores.journal)
        counts: RegionCounts | None = None
        if stores.store is not None and isinstance(stores.journal, PostgresJournal):
            protection.add_source(PostgresUserData(stores.store, stores.journal))
            counts = PostgresRegionCounts(stores.store)
        if stores.shared is not None:
            protection.add_source(RedisUserData(stores.shared, service.experiment_handles))
        if learning is not None and code == regions.default:
            protection.add_source(LearningUserData(learning))
        erasures = None
        if counts is not None and stores.store is not None and settings.erasure.poll_interval:
            erasures = ErasureFollower(
                code,
                PostgresErasureLog(stores.store),
                _held_users(service, learning if code == regions.default else None),
                protection.erase_here,
            )
            protection.announce = erasures.announce
        runtimes[code] = RegionRuntime(
            region=regions.regions[code],
            service=service,
            journal=stores.journal,
            protection=protection,
            counts=counts,
            healthy=_health(stores),
            close=stores.close,
            erasures=erasures,
        )
    home_store = home[0].store
    saver = None if home_store is None else (lambda r: save_region(home_store, r))
    return Regions(regions, runtimes, save_region=saver)


def _held_users(
    service: AllocationService, learning: LearningData | None
) -> Callable[[], set[str]]:
    def held() -> set[str]:
        users = service.held_user_ids()
        return users if learning is None else users | learning.held_user_ids()

    return held


def _health(stores: Stores) -> Callable[[], bool]:
    from allocsvc.store.writebehind import PostgresJournal

    def healthy() -> bool:
        ok = stores.shared is None or stores.shared.healthy
        if isinstance(stores.journal, PostgresJournal):
            ok = ok and stores.journal.healthy
        return ok

    return healthy
