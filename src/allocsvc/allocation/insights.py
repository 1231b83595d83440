"""What operators ask about experiments: segments, analysis, power, validation, eligibility,
recommendations and the segment tree. Composes the pure functions of `allocsvc.analytics` and
`allocsvc.hierarchy` with the live state of the allocation service and the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from allocsvc.allocation.experiments import (
    Experiment,
    Policy,
    Segmentation,
    SegmentationMode,
    Status,
)
from allocsvc.allocation.journal import Journal, StoredRecommendation, TreeNodeRecord
from allocsvc.allocation.service import AllocationService
from allocsvc.analytics import (
    ActivationConfig,
    ActivationFailure,
    Alert,
    AlertKind,
    ArmCounts,
    DailyTraffic,
    EarlyStoppingDecision,
    EligibilityConfig,
    Recommendation,
    RecommendationKind,
    SampleRatioCheck,
    SampleSize,
    SampleSizeQuery,
    SegmentAnalysis,
    SegmentAnalysisSettings,
    SegmentVariantCounts,
    TrafficPlan,
    UnderperformanceSettings,
    activation_failed_alert,
    analyze_segments,
    days_needed,
    decide_activation,
    early_stopping,
    recommend_segmentation,
    sample_ratio_mismatch,
    sample_size,
    stale_model_alert,
    traffic_window,
    underperforming_segments,
)
from allocsvc.core import parent_keys
from allocsvc.errors import FailedPrecondition, InvalidRequest, NotFound
from allocsvc.hierarchy import (
    CascadeUsage,
    HierarchySettings,
    SegmentTree,
    build_tree,
    cascade_usage,
    node_to_dict,
    stats_from_counts,
)

log = logging.getLogger(__name__)

# Dimensions switched on by auto-activation when the experiment names none.
DEFAULT_DIMENSIONS = ("source", "device")
SYSTEM_ACTOR = "system:eligibility"


@dataclass(frozen=True, slots=True)
class SegmentCounts:
    segment_key: str
    level: int
    variants: tuple[
        tuple[str, int, int, float], ...
    ]  # (variant id, allocations, conversions, value)


@dataclass(frozen=True, slots=True)
class Eligibility:
    eligible: bool
    average_daily_visitors: float
    threshold: int
    recommendation: Recommendation
    reason: str


@dataclass(frozen=True, slots=True)
class Validation:
    sample_ratio: SampleRatioCheck | None
    sample_ratio_reason: str
    early_stopping: EarlyStoppingDecision
    alerts: tuple[Alert, ...]


class Snapshot(NamedTuple):
    """The counts a tree is built from: allocations, `Engine.snapshot` rows, segment keys."""

    allocations: int
    rows: list[tuple[int, int, int, int, int, float]]
    keys: list[str]


@dataclass(frozen=True, slots=True)
class BuiltTree:
    tree: SegmentTree
    version: int


class Insights:
    def __init__(
        self,
        service: AllocationService,
        journal: Journal,
        *,
        window_days: int = 7,
        first_rebuild_at: int = 0,
        growth_check_interval: float = 2.0,
        deployed_model: Callable[[], tuple[str, datetime, timedelta] | None] | None = None,
    ) -> None:
        self._service = service
        # The clustering model `auto` experiments are served with: name, trained at, max age.
        self._deployed_model = deployed_model
        self._journal = journal
        self._window_days = window_days
        self._first_rebuild_at = first_rebuild_at
        self._growth_check_interval = growth_check_interval
        # Set by `wake_growth` when trees are due by growth; `_due` holds the counts they
        # are built from (experiment key and counts, by handle).
        self._grown = asyncio.Event()
        self._due: dict[int, tuple[str, Snapshot]] = {}
        self._trees: dict[int, BuiltTree] = {}
        # Allocations of each experiment when its tree was last built (`rebuild_grown`).
        self._built_at: dict[int, int] = {}
        # Alerts found by the last periodic check, per experiment key.
        self.alerts: dict[str, tuple[Alert, ...]] = {}
        self._versions: dict[int, int] = {}

    @property
    def _default_dimensions(self) -> tuple[str, ...]:
        """Dimensions proposed for an experiment that names none: the server's
        hierarchy_levels, else DEFAULT_DIMENSIONS."""
        return self._service.defaults.hierarchy_levels or DEFAULT_DIMENSIONS

    # Segments ---------------------------------------------------------------------------

    def segments(self, key: str) -> list[SegmentCounts]:
        """Every known segment of the experiment with per-variant totals, ordered by key."""
        experiment = self._service.get_experiment(key)
        variant_ids = [v.key for v in experiment.variants]
        totals: dict[int, list[list[float]]] = {}
        for _, segment_hash, variant, a, c, v in self._service.snapshot(experiment.handle):
            if variant < len(variant_ids):
                row = totals.setdefault(segment_hash, [[0, 0, 0.0] for _ in variant_ids])
                row[variant] = [a, c, v]
        out = []
        for segment_key, segment_hash in self._service.segment_keys(experiment.handle):
            counts = totals.get(segment_hash)
            if counts is None:
                continue
            out.append(
                SegmentCounts(
                    segment_key,
                    len(parent_keys(segment_key)) - 1,
                    tuple(
                        (vid, int(x[0]), int(x[1]), float(x[2]))
                        for vid, x in zip(variant_ids, counts, strict=True)
                    ),
                )
            )
        return sorted(out, key=lambda s: s.segment_key)

    def _variant_counts(self, key: str) -> list[SegmentVariantCounts]:
        return [
            SegmentVariantCounts(s.segment_key, vid, a, c)
            for s in self.segments(key)
            for vid, a, c, _ in s.variants
        ]

    def analyze(self, key: str, min_allocations: int = 0, alpha: float = 0.0) -> SegmentAnalysis:
        settings = SegmentAnalysisSettings(
            min_allocations=min_allocations or 100, alpha=alpha or 0.05
        )
        return analyze_segments(self._variant_counts(key), settings)

    # Power ------------------------------------------------------------------------------

    async def sample_size(
        self, query: SampleSizeQuery, daily_traffic: float, experiment_key: str, horizon_days: int
    ) -> tuple[SampleSize, TrafficPlan | None]:
        size = sample_size(query)
        traffic = daily_traffic
        if traffic <= 0 and experiment_key:
            experiment = self._service.get_experiment(experiment_key)
            daily = await self._journal.traffic(experiment.handle)
            traffic = traffic_window(daily, self._window_days).average_visitors
        if traffic <= 0:
            return size, None
        plan = days_needed(size.total, traffic, horizon_days or None)
        return size, plan

    # Validation -------------------------------------------------------------------------

    def validate(self, key: str) -> Validation:
        experiment = self._service.get_experiment(key)
        global_counts = {s.segment_key: s for s in self.segments(key)}.get("")
        arms = [
            ArmCounts(vid, a, c)
            for vid, a, c, _ in (
                global_counts.variants
                if global_counts is not None
                else tuple((v.key, 0, 0, 0.0) for v in experiment.variants)
            )
        ]
        srm: SampleRatioCheck | None = None
        if experiment.policy is Policy.THOMPSON:
            srm_reason = "thompson allocation has no fixed split to check"
        else:
            weights = [v.weight if v.weight is not None else 1.0 for v in experiment.variants]
            srm = sample_ratio_mismatch([a.allocations for a in arms], weights)
            srm_reason = srm.reason or ""
        stopping = early_stopping(arms)
        alerts = underperforming_segments(
            experiment.key, self._variant_counts(key), UnderperformanceSettings()
        )
        failures = [
            a for a in self.alerts.get(key, ()) if a.kind == AlertKind.AUTO_ACTIVATION_FAILED
        ]
        stale = self._model_alerts(experiment)
        return Validation(srm, srm_reason, stopping, (*alerts, *failures, *stale))

    def _model_alerts(self, experiment: Experiment) -> tuple[Alert, ...]:
        """A stale clustering model, for the experiments `auto` segmentation serves with it."""
        auto = experiment.segmentation.mode is SegmentationMode.AUTO
        if self._deployed_model is None or not auto:
            return ()
        deployed = self._deployed_model()
        if deployed is None:
            return ()
        name, trained, max_age = deployed
        alert = stale_model_alert(name, trained, datetime.now(UTC), max_age)
        return () if alert is None else (alert,)

    # Eligibility and recommendations ----------------------------------------------------

    async def eligibility(self, key: str) -> Eligibility:
        experiment = self._service.get_experiment(key)
        threshold = experiment.segmentation.auto_activation_threshold
        daily = await self._journal.traffic(experiment.handle)
        recommendation = self._recommend(experiment, daily)
        window = traffic_window(daily, self._window_days)
        eligible = window.complete and window.average_visitors >= threshold
        return Eligibility(
            eligible, window.average_visitors, threshold, recommendation, recommendation.reason
        )

    def _recommend(self, experiment: Experiment, daily: Sequence[DailyTraffic]) -> Recommendation:
        config = EligibilityConfig(
            min_visitors_per_day=experiment.segmentation.auto_activation_threshold,
            window_days=self._window_days,
        )
        now = datetime.now(UTC)
        recommendation = recommend_segmentation(
            config, daily, self._variant_counts(experiment.key), now
        )
        if (
            recommendation.kind is RecommendationKind.NO_SIGNAL
            and experiment.segmentation.mode is SegmentationMode.DISABLED
        ):
            # With segmentation off there are no per-dimension counts to test: traffic alone
            # qualifies, for the dimensions the experiment names (or the defaults).
            dims = experiment.segmentation.segment_by or self._default_dimensions
            return Recommendation(
                kind=RecommendationKind.ENABLE_SEGMENTATION,
                dimensions=tuple(dims),
                expected_benefit=0.0,
                reason=(
                    f"{recommendation.average_daily_visitors:.0f} visitors/day pass the "
                    f"threshold of {config.min_visitors_per_day:.0f}; segmentation is off, so "
                    f"no dimension could be tested yet: start with {', '.join(dims)}"
                ),
                created_at=now,
                average_daily_visitors=recommendation.average_daily_visitors,
                scores=(),
            )
        return recommendation

    async def run_eligibility_checks(self) -> None:
        """The periodic check: store recommendations and auto-activate where configured."""
        for experiment in self._service.list_experiments(Status.RUNNING):
            try:
                await self._check(experiment)
            except Exception:
                log.exception("eligibility check failed", extra={"experiment": experiment.key})

    async def _check(self, experiment: Experiment) -> None:
        self.alerts[experiment.key] = self.validate(experiment.key).alerts
        daily = await self._journal.traffic(experiment.handle)
        recommendation = self._recommend(experiment, daily)
        if await self._is_news(experiment, recommendation):
            await self._journal.save_recommendation(
                experiment.handle, recommendation.kind.value, recommendation.payload()
            )
        seg = experiment.segmentation
        decision = decide_activation(
            ActivationConfig(
                auto_activation=seg.auto_activation,
                threshold=seg.auto_activation_threshold,
                window_days=self._window_days,
                already_active=seg.mode is not SegmentationMode.DISABLED,
            ),
            daily,
        )
        if not decision.activate:
            return
        if not self._service.defaults.contextual:
            # Switched on, it would not be served; the recommendation above is kept.
            return
        dims = recommendation.dimensions or seg.segment_by or self._default_dimensions
        try:
            await self._service.update_experiment(
                experiment.key,
                {"segmentation": _manual(seg, tuple(dims))},
            )
        except Exception as exc:
            failure = activation_failed_alert(
                ActivationFailure(experiment.key, str(exc), datetime.now(UTC))
            )
            self.alerts[experiment.key] = (*self.alerts.get(experiment.key, ()), failure)
            log.warning("auto-activation failed", extra={"experiment": experiment.key})
            await self._journal.audit(
                SYSTEM_ACTOR, "auto_activation_failed", experiment.key, {"error": str(exc)}
            )
            return
        await self._journal.audit(
            SYSTEM_ACTOR,
            "auto_activation",
            experiment.key,
            {"dimensions": list(dims), "reason": decision.reason},
        )
        log.info(
            "segmentation auto-activated",
            extra={"experiment": experiment.key, "dimensions": list(dims)},
        )

    async def _is_news(self, experiment: Experiment, recommendation: Recommendation) -> bool:
        """Worth storing: it enables segmentation on dimensions the experiment does not use
        already, and nobody has accepted or dismissed the same advice before."""
        if recommendation.kind is not RecommendationKind.ENABLE_SEGMENTATION:
            return False
        if (
            experiment.segmentation.mode is not SegmentationMode.DISABLED
            and experiment.segmentation.segment_by == recommendation.dimensions
        ):
            return False
        earlier = await self._journal.recommendations(experiment.handle, None)
        return not any(
            r.kind == recommendation.kind.value and r.dimensions == recommendation.dimensions
            for r in earlier
        )

    async def recommendations(
        self, key: str | None, status: str | None
    ) -> list[StoredRecommendation]:
        handle = self._service.get_experiment(key).handle if key else None
        if status and status not in ("pending", "accepted", "dismissed"):
            raise InvalidRequest("status", "one of pending, accepted, dismissed")
        return await self._journal.recommendations(handle, status or None)

    async def decide(
        self, recommendation_id: str, accept: bool, actor: str
    ) -> StoredRecommendation:
        found = await self._journal.get_recommendation(recommendation_id)
        if found is None:
            raise NotFound(f"recommendation {recommendation_id!r} does not exist")
        if found.status != "pending":
            raise FailedPrecondition(f"recommendation {recommendation_id!r} is {found.status}")
        experiment = self._service.experiment_by_handle(found.handle)
        if accept:
            dims = tuple(str(d) for d in found.dimensions)
            if not dims:
                raise FailedPrecondition(
                    f"recommendation {recommendation_id!r} names no dimensions"
                )
            await self._service.update_experiment(
                experiment.key, {"segmentation": _manual(experiment.segmentation, dims)}
            )
        decided = await self._journal.decide_recommendation(
            recommendation_id, "accepted" if accept else "dismissed", actor
        )
        if decided is None:
            raise FailedPrecondition(f"recommendation {recommendation_id!r} is no longer pending")
        await self._journal.audit(
            actor,
            "recommendation_accepted" if accept else "recommendation_dismissed",
            experiment.key,
            {"recommendation": recommendation_id},
        )
        return decided

    # Segment tree -----------------------------------------------------------------------

    def _counts_now(self, handle: int) -> Snapshot:
        """What a tree of the experiment is built from, as the counts stand now."""
        return Snapshot(
            self._service.allocations(handle),
            self._service.snapshot(handle),
            [k for k, _ in self._service.segment_keys(handle)],
        )

    async def rebuild_tree(self, key: str, counts: Snapshot | None = None) -> BuiltTree:
        """Build the tree off the event loop (from `counts`, else the counts as they stand)
        and swap it into the engine."""
        experiment = self._service.served_experiment(key)
        if not experiment.dimensions:
            why = (
                "segmentation disabled"
                if self._service.get_experiment(key).dimensions == ()
                else "no segments served (contextual bandits are off in this server)"
            )
            raise FailedPrecondition(f"experiment {key!r} has {why}: no levels")
        settings = HierarchySettings.for_experiment(experiment)
        allocations, rows, keys = counts or self._counts_now(experiment.handle)
        names = tuple(v.key for v in experiment.variants)

        def build() -> SegmentTree:
            stats = stats_from_counts(rows, keys, variants=len(names))
            return build_tree(stats, settings, variant_names=names)

        tree = await asyncio.to_thread(build)
        self._service.set_tree(experiment.handle, tree.kept_hashes())
        self._built_at[experiment.handle] = allocations
        log.info(
            "segment tree rebuilt",
            extra={"experiment": key, "allocations": allocations, "kept": tree.summary.kept},
        )
        try:
            await self._journal.save_tree(experiment.handle, _records(tree))
        except Exception:
            # The tree serves already; only its stored copy is missing until the next rebuild.
            log.exception("segment tree not stored", extra={"experiment": key})
        version = self._versions.get(experiment.handle, 0) + 1
        self._versions[experiment.handle] = version
        built = BuiltTree(tree, version)
        self._trees[experiment.handle] = built
        return built

    async def tree(self, key: str) -> BuiltTree:
        """The last built tree, or a new one if none was built yet."""
        experiment = self._service.get_experiment(key)
        built = self._trees.get(experiment.handle)
        return built if built is not None else await self.rebuild_tree(key)

    def cascade(self, key: str) -> CascadeUsage:
        experiment = self._service.served_experiment(key)
        return cascade_usage(self._service.cascade_counts(experiment.handle), experiment.dimensions)

    async def rebuild_grown(self) -> None:
        """Rebuild the tree of every running, segmented experiment whose data has grown enough
        since its last tree: once its allocations reach `first_rebuild_at`, and again each time
        they have doubled. While data is young a tree built minutes ago is based on a fraction
        of what is known now, and until the first tree the experiment is served from its
        global node only (`AllocationService.global_until_first_tree`). 0 switches this off."""
        if self._first_rebuild_at <= 0:
            return
        await self._rebuild_running(
            lambda handle: self._service.allocations(handle) >= self._next_growth(handle)
        )

    def wake_growth(self, handles: Iterable[int]) -> None:
        """Allocations were made in the experiments `handles` (`AllocationService.on_growth`,
        on the event loop): take the counts of each whose tree is due by growth as they stand
        at this very allocation, and wake `rebuild_grown_on_wake` to build from them. Trees
        then follow the number of allocations, not the clock or how fast requests come; only
        the experiments that allocated are looked at, however many a server holds."""
        if self._first_rebuild_at <= 0:
            return
        for handle in handles:
            if handle in self._due:
                continue
            try:
                experiment = self._service.experiment_by_handle(handle)
            except NotFound:  # removed since
                continue
            if experiment.status is not Status.RUNNING or not self._segmented(experiment):
                continue
            if self._service.allocations(handle) >= self._next_growth(handle):
                counts = self._counts_now(handle)
                self._built_at[handle] = counts.allocations
                self._due[handle] = (experiment.key, counts)
        if self._due:
            self._grown.set()

    def _next_growth(self, handle: int) -> int:
        return max(2 * self._built_at.get(handle, 0), self._first_rebuild_at)

    async def rebuild_grown_on_wake(self) -> None:
        """Build the trees `wake_growth` found due, once woken, or after
        `growth_check_interval` seconds at the latest `rebuild_grown` (other replicas'
        traffic grows the counts without waking it)."""
        # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a cancellation
        # that arrives as its inner wait finishes, and this job runs 20 times a second.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._growth_check_interval):
                await self._grown.wait()
        self._grown.clear()
        due, self._due = self._due, {}
        for key, counts in due.values():
            await self._rebuild_logged(key, counts)
        await self.rebuild_grown()

    async def rebuild_restored(self) -> None:
        """At start: rebuild the tree of every running, segmented experiment that has
        allocations already (restored from the store), so that a restart keeps serving its
        segments instead of waiting for the next rebuild. The tree is built from the same
        persisted counts as the last one stored; growth rebuilds continue from here."""
        await self._rebuild_running(lambda handle: self._service.allocations(handle) > 0)

    async def rebuild_all(self) -> None:
        """The periodic rebuild of every running, segmented experiment's tree."""
        await self._rebuild_running(lambda handle: True)

    def _segmented(self, experiment: Experiment) -> bool:
        """Whether the experiment, as served, has segment levels (a tree to build)."""
        return bool(self._service.served_experiment(experiment.key).dimensions)

    async def _rebuild_running(self, due: Callable[[int], bool]) -> None:
        """Rebuild the tree of every running, segmented experiment whose handle is `due`."""
        for experiment in self._service.list_experiments(Status.RUNNING):
            if self._segmented(experiment) and due(experiment.handle):
                await self._rebuild_logged(experiment.key)

    async def _rebuild_logged(self, key: str, counts: Snapshot | None = None) -> None:
        """`rebuild_tree`, a failure logged rather than raised (background rebuilds)."""
        try:
            await self.rebuild_tree(key, counts)
        except Exception:
            log.exception("tree rebuild failed", extra={"experiment": key})


def _records(tree: SegmentTree) -> list[TreeNodeRecord]:
    records = []
    for node in tree.nodes:
        a = sum(n for n, _ in node.stats.variant_counts)
        c = sum(k for _, k in node.stats.variant_counts)
        records.append(
            TreeNodeRecord(
                segment_hash=node.segment_hash,
                parent_hash=node.kept_parent_hash if node.kept else node.parent_hash,
                level=node.level,
                segment_key=node.key,
                allocations=a,
                conversions=c,
                value_sum=node.stats.value_sum,
                stats=node_to_dict(tree, node),
                pruned=not node.kept,
            )
        )
    return records


def _manual(seg: Segmentation, dims: tuple[str, ...]) -> Segmentation:
    return Segmentation(
        mode=SegmentationMode.MANUAL,
        segment_by=dims,
        min_samples_per_segment=seg.min_samples_per_segment,
        auto_activation=seg.auto_activation,
        auto_activation_threshold=seg.auto_activation_threshold,
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000
