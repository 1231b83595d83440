"""Routing to regions: one allocation service and one set of stores per region.

A request is served by the region of its country (context `country_code`; unknown or missing
countries go to the default region). Personal data is written only to that region's stores.
Experiments are managed in the default ("home") region and copied to the others; only
aggregate counts cross regions (allocsvc.regions.sync).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from allocsvc.allocation.experiments import Experiment
from allocsvc.allocation.journal import Journal
from allocsvc.allocation.service import AllocationService
from allocsvc.errors import NotFound
from allocsvc.regions.erasures import ErasureFollower
from allocsvc.regions.gdpr import DataProtection, Erasure, UserExport
from allocsvc.regions.model import Region, RegionMap
from allocsvc.regions.sync import RegionCounts, SyncReport, TotalRow, sync_once

log = logging.getLogger(__name__)


@dataclass
class RegionRuntime:
    """What serves one region."""

    region: Region
    service: AllocationService
    journal: Journal
    protection: DataProtection
    counts: RegionCounts | None = None
    healthy: Callable[[], bool] = lambda: True
    close: Callable[[], Awaitable[None]] | None = None
    # Applies other processes' erasures here (None: the region has no PostgreSQL).
    erasures: ErasureFollower | None = None


class Regions:
    """Every region this process serves, and how a request finds its region."""

    def __init__(
        self,
        regions: RegionMap,
        runtimes: Mapping[str, RegionRuntime],
        *,
        save_region: Callable[[Region], Awaitable[None]] | None = None,
    ) -> None:
        missing = set(regions.regions) - set(runtimes)
        if missing:
            raise ValueError(f"regions without stores: {sorted(missing)}")
        self.map = regions
        self._runtimes = dict(runtimes)
        self._save_region = save_region
        self.last_sync: SyncReport | None = None

    @property
    def home(self) -> RegionRuntime:
        return self._runtimes[self.map.default]

    @property
    def runtimes(self) -> Mapping[str, RegionRuntime]:
        return self._runtimes

    @property
    def multi(self) -> bool:
        return len(self._runtimes) > 1

    def serving(self, code: str) -> bool:
        return code in self._runtimes

    def runtime(self, code: str) -> RegionRuntime:
        found = self._runtimes.get(code)
        if found is None:
            raise NotFound(f"region {code!r} is not served by this server")
        return found

    def for_country(self, country: str | None) -> RegionRuntime:
        """The runtime of the country's region. A region added at runtime is served only after
        a restart: until then its countries stay with the default region, as before."""
        return self._runtimes.get(self.map.for_country(country)) or self.home

    def for_conversion(
        self, assignment_id: str, experiment_key: str, user_id: str
    ) -> RegionRuntime:
        """The region holding the assignment (the home region when none does: it answers
        NOT_FOUND the usual way)."""
        for runtime in self._runtimes.values():
            if runtime.service.holds(assignment_id, experiment_key, user_id):
                return runtime
        return self.home

    # Region configuration -----------------------------------------------------------------

    async def upsert(self, region: Region) -> Region:
        """Add or change a region's configuration, saved in the home region's PostgreSQL
        (loaded at the next start; the config file wins for a code it names). Country routing,
        name, GDPR flag and failover of served regions change at once. A region new to this
        server is not served (`serving` false) until a restart opens its stores; until then
        its countries stay with the default region."""
        self.map.upsert(region)
        if self._save_region is not None:
            await self._save_region(region)
        if region.code in self._runtimes:
            self._runtimes[region.code].region = region
        return region

    # Experiments: managed in the home region, copied to the others -----------------------

    async def replicate_experiments(self) -> None:
        home = self.home.service.list_experiments()
        for code, runtime in self._runtimes.items():
            if code == self.map.default:
                continue
            for experiment in home:
                await self._copy(runtime, experiment)

    async def _copy(self, runtime: RegionRuntime, experiment: Experiment) -> None:
        try:
            local = runtime.service.get_experiment(experiment.key)
        except NotFound:
            saved = await runtime.journal.save_experiment(
                experiment.with_changes(handle=0), new=True
            )
            runtime.service.load_experiments([saved])
            return
        if _same(local, experiment):
            return
        saved = await runtime.journal.save_experiment(
            experiment.with_changes(handle=local.handle, created_at_ms=local.created_at_ms),
            new=False,
        )
        # Installed even when the store's clock says otherwise: the home region decides.
        runtime.service.load_experiments(
            [saved.with_changes(updated_at_ms=max(saved.updated_at_ms, local.updated_at_ms + 1))]
        )

    # Aggregate sync -------------------------------------------------------------------------

    async def sync(self) -> SyncReport:
        """Exchange aggregate counts, then make each region decide on global counts: its own
        live counts plus the latest totals of the others (an offset loaded into its engine).
        A region whose store is down keeps the offset it had."""
        counts = {c: r.counts for c, r in self._runtimes.items() if r.counts is not None}
        self.last_sync = await sync_once(counts)
        for code, runtime in self._runtimes.items():
            if runtime.counts is None:
                continue
            try:
                remote = await runtime.counts.remote_totals()
            except Exception as exc:
                log.warning(
                    "region sync: remote totals unavailable",
                    extra={"region": code, "error": repr(exc)},
                )
                continue
            runtime.service.set_remote_counts(remote)
        return self.last_sync

    async def global_counts(self, code: str) -> list[TotalRow]:
        runtime = self.runtime(code)
        if runtime.counts is None:
            return []
        return await runtime.counts.global_totals()

    # Data protection ----------------------------------------------------------------------

    def _targets(self, code: str) -> Sequence[RegionRuntime]:
        return [self.runtime(code)] if code else list(self._runtimes.values())

    async def export(self, user_id: str, code: str, actor: str) -> list[UserExport]:
        """The user's data in one region, or in every region (only those holding any)."""
        found = [await r.protection.export(user_id, actor) for r in self._targets(code)]
        return [e for e in found if e.sources] or found[:1]

    async def erase(self, user_id: str, code: str, actor: str, reason: str) -> list[Erasure]:
        return [await r.protection.erase(user_id, actor, reason) for r in self._targets(code)]

    async def close(self) -> None:
        """Close the stores of every region but the home one (the server closes that)."""
        for code, runtime in self._runtimes.items():
            if code != self.map.default and runtime.close is not None:
                await runtime.close()


def _same(a: Experiment, b: Experiment) -> bool:
    ignore = {"handle": 0, "created_at_ms": 0, "updated_at_ms": 0}
    return a.with_changes(**ignore) == b.with_changes(**ignore)
