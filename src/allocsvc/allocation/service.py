"""The allocation service: experiments, sticky assignments, allocation and conversions.

Allocation is synchronous and does no I/O: one Rust call decides and counts; the assignment
goes to the journal's write-behind buffer. A conversion is acknowledged only after the journal
says it is durable (and whether it was new: idempotency is the journal's to enforce).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from allocsvc.allocation.experiments import (
    Experiment,
    Policy,
    SegmentationDefaults,
    SegmentationMode,
    Status,
    Variant,
    validate,
)
from allocsvc.allocation.journal import Conversion, Journal, SharedState
from allocsvc.context import ExtractedContext, Extractor
from allocsvc.core import (
    AssignmentLog,
    BatchCatalogue,
    Engine,
    HeldAssignments,
    MadeAssignments,
    PreparedBatch,
    UnaryLane,
    UnaryPath,
    key_hash,
    parent_keys,
)
from allocsvc.errors import (
    AllocsvcError,
    AlreadyExists,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    Unavailable,
)
from allocsvc.learning.features import RawFeatures
from allocsvc.learning.sampling import ObservationGaps

if TYPE_CHECKING:
    from allocsvc._core import Features, GivenAllocation, UnaryFollowUp, UnaryOutcome

log = logging.getLogger(__name__)
# Value used for the cluster dimension until a clustering model is deployed.
NO_CLUSTER = "none"
_TRANSITIONS = {
    Status.DRAFT: {Status.RUNNING, Status.ARCHIVED},
    Status.RUNNING: {Status.PAUSED, Status.ARCHIVED},
    Status.PAUSED: {Status.RUNNING, Status.ARCHIVED},
    Status.ARCHIVED: set(),
}
UPDATABLE_FIELDS = frozenset(
    {
        "name",
        "description",
        "status",
        "variants",
        "policy",
        "segmentation",
        "hierarchy",
        "exploration",
        "propensity_floor",
        "sticky",
    }
)


@dataclass(frozen=True, slots=True)
class Limits:
    max_variants: int = 100
    max_batch_items: int = 10_000
    max_user_id_chars: int = 256
    # Assignments held in memory (0: no bound); past it the oldest are evicted and read back
    # from the journal's durable store when asked for.
    max_held_assignments: int = 0
    # Keys the first part of the filter of evicted users holds (0: max_held_assignments, at
    # least 65,536); it fills at 31 times that (then `renew_evicted_filter`).
    evicted_filter_keys: int = 0


# The objects made on every allocation are NamedTuples: immutable like frozen dataclasses,
# and about a third of their cost to build (no object.__setattr__ per field).
class AllocationRequest(NamedTuple):
    experiment_key: str
    user_id: str
    channel: str = ""
    context: Mapping[str, str] | None = None
    signals: Mapping[str, float] | None = None
    timestamp_ms: int = 0


class Assignment(NamedTuple):
    id: str
    experiment_key: str
    handle: int
    user_id: str
    variant: int
    segment_key: str
    cascade_level: int
    propensity: float
    created_ms: int


# An assignment as the Rust store of held assignments gives it back: its fields as a tuple.
# It takes an `Assignment` as it is (a tuple of those fields).
Held = tuple[str, str, int, str, int, str, int, float, int]
# `PostgresJournal.list_users`: (handle, list_copied(data, at_start)) -> rows read.
ListUsers = Callable[[int, Callable[[bytes, bool], tuple[int, int, bool]]], Awaitable[int]]
# `recall_sticky`: the assignments read back from the durable store, by (handle, user id).
Recalled = dict[tuple[int, str], Assignment]


class StoredUsers(Protocol):
    """What renewing the filter of evicted users asks of the durable store
    (`PostgresJournal`)."""

    async def flushed(self) -> bool:
        """Flush: whether everything buffered before the call is written."""

    async def list_stored(
        self,
        handles: Sequence[int],
        list_block: Callable[[bytes], int],
        list_copied: Callable[[int, bytes, bool], tuple[int, int, bool]],
    ) -> int:
        """In one snapshot, every block to `list_block` and the users of each experiment's
        rows to `list_copied(handle, data, at_start)`: rows read."""


def _made_at(a: Assignment) -> int:
    return a.created_ms


def configure_engine(engine: Engine, experiment: Experiment) -> None:
    """Install `experiment`, as allocation serves it (segment levels and minimums with the
    server's defaults applied), in the Rust engine."""
    weights = [v.weight for v in experiment.variants]
    engine.configure(
        experiment.handle,
        variants=len(experiment.variants),
        dimensions=list(experiment.dimensions),
        min_samples=list(experiment.min_samples),
        policy=experiment.policy.value,
        weights=None if any(w is None for w in weights) else [float(w or 0) for w in weights],
        warm_start=experiment.hierarchy.warm_start_strength,
        exploration=experiment.exploration.bonus_scale,
        salt=key_hash(experiment.key),
        propensity_floor=experiment.propensity_floor,
    )


class Allocation(NamedTuple):
    assignment: Assignment
    variant: Variant
    sticky: bool


@dataclass(frozen=True, slots=True)
class ConversionRequest:
    assignment_id: str = ""
    experiment_key: str = ""
    user_id: str = ""
    value: float = 0.0
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class ConversionResult:
    assignment: Assignment
    variant: Variant
    counted: bool


def _no_nul(field: str, value: str) -> None:
    # PostgreSQL text cannot hold NUL: refuse it up front instead of failing the write-behind.
    if "\x00" in value:
        raise InvalidRequest(field, "must not contain NUL characters")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class LearningHook(Protocol):
    """Sees a sample of allocations' contexts, and names the cluster of `auto` segmentation."""

    # Gaps between observed allocations; None: learning observes nothing.
    gaps: ObservationGaps | None

    def observe(self, user_id: str, context: ExtractedContext) -> None: ...

    def observe_features(self, user_id: str, row: RawFeatures) -> None: ...

    def cluster_of(self, context: ExtractedContext) -> str: ...


class AllocationService:
    """Experiments and the hot path. Not thread-safe: call it from one event loop."""

    # Set by attach_learning; None: `auto` experiments use the NO_CLUSTER segment.
    _learning: LearningHook | None = None
    # Sampling of allocations for learning (None: off); the countdown is the lane's.
    _gaps: ObservationGaps | None = None
    # Set by on_growth: called once per `_growth_every` allocations made here, with the
    # handles of the experiments they were made in.
    _on_growth: Callable[[set[int]], None] | None = None
    _growth_every: int = 1
    _growth_countdown: int = 1

    def __init__(
        self,
        engine: Engine,
        journal: Journal,
        extractor: Extractor,
        limits: Limits | None = None,
        shared: SharedState | None = None,
        defaults: SegmentationDefaults | None = None,
    ) -> None:
        self._engine = engine
        self._defaults = defaults or SegmentationDefaults()
        self._shared = shared
        self._journal = journal
        self._extractor = extractor
        self._limits = limits or Limits()
        self._experiments: dict[str, Experiment] = {}
        self._by_handle: dict[int, Experiment] = {}
        # Other regions' latest totals per (handle, segment hash, variant), added to this
        # region's own counts so that decisions use global posteriors (set_remote_counts).
        self._remote: dict[tuple[int, int, int], tuple[int, int, float]] = {}
        # Each experiment as allocation serves it (`SegmentationDefaults.served`), by handle.
        self._served: dict[int, Experiment] = {}
        self._id_prefix = secrets.token_hex(6)
        # Ids of new assignments (every path's), and what Rust counts of the unary calls it
        # answers whole: their cascade levels, segment keys seen, the countdowns to the next
        # observed call and the next growth report (`allocate_wire`).
        self._lane = UnaryLane()
        # Latest assignment per (experiment handle, user id), every assignment by id and by
        # user: in Rust, no Python object per assignment (none for the collector to walk).
        self._held = HeldAssignments(
            self._id_prefix,
            self._limits.max_held_assignments,
            self._limits.evicted_filter_keys,
        )
        # A renewal of the evicted users' filter started and not listed yet.
        self._renewing = False
        # Users and assignment ids looked up in the durable store because memory may not hold
        # them, and how many of those it had (the rest: the filter's false passes).
        self._store_lookups = 0
        self._store_lookups_found = 0
        # Where Rust logs the new assignments of unary calls for the write-behind (held by
        # Rust too): no Python object per assignment. None when each goes through `_keep`
        # (a journal that needs each one passed; replicas, which share each one).
        self._log: AssignmentLog | None = None
        if shared is None:
            log = AssignmentLog(self._id_prefix)
            self._log = log if journal.attach_log(log) else None
        # Known segment keys per experiment (every level of every path seen), by key -> hash.
        self._segments: dict[int, dict[str, int]] = {}
        # Allocations and conversions per (experiment, cascade level) since start.
        self._cascade_allocations: Counter[tuple[int, int]] = Counter()
        self._cascade_conversions: Counter[tuple[int, int]] = Counter()
        # With trees built automatically (`global_until_first_tree`), the experiments not given
        # a tree yet are served from their global node only.
        self._global_until_first_tree = False
        self._with_tree: set[int] = set()
        # What AllocateBatch needs to run its items in Rust (kept in step by _install).
        context_limits = extractor.limits
        self._catalogue = BatchCatalogue(
            max_context_entries=context_limits.max_context_entries,
            max_signals=context_limits.max_signals,
            max_key_chars=context_limits.max_key_chars,
            max_value_chars=context_limits.max_value_chars,
            max_user_agent_chars=context_limits.max_user_agent_chars,
            max_referrer_chars=context_limits.max_referrer_chars,
            max_user_id_chars=self._limits.max_user_id_chars,
            device_cache_size=extractor.cache_info().maxsize or 0,
        )

    @property
    def limits(self) -> Limits:
        return self._limits

    def attach_learning(self, learning: LearningHook) -> None:
        self._learning = learning
        self._gaps = learning.gaps
        self._lane.observe_in(None if self._gaps is None else self._gaps.next())

    def on_growth(self, callback: Callable[[set[int]], None], every: int) -> None:
        """Call `callback` once per `every` allocations made by this process (unary and batch),
        on the event loop, right after the allocations are counted, with the handles of the
        experiments allocated in since the last call. It must be cheap and do no I/O (it sits
        on the hot path): e.g. wake a background task."""
        self._on_growth = callback
        self._growth_every = self._growth_countdown = max(1, every)
        self._grown_handles: set[int] = set()
        self._lane.grow_in(self._growth_countdown)

    def _grown(self, allocations: int) -> None:
        """Count `allocations` more (their handles added to `_grown_handles`) and those the
        lane counted, toward the next growth report."""
        counted, taken = self._lane.take_grown()
        self._grown_handles.update(taken)
        self._growth_countdown -= allocations + counted
        if self._growth_countdown <= 0 and self._on_growth is not None:
            self._growth_countdown = self._growth_every
            handles, self._grown_handles = self._grown_handles, set()
            self._on_growth(handles)
        self._lane.grow_in(self._growth_countdown)

    @property
    def learns(self) -> bool:
        """True when (a sample of) allocations' contexts feed a learning hook."""
        return self._gaps is not None

    def observes_next(self) -> bool:
        """Whether learning observes the next allocation (a unary one): one countdown step."""
        if self._gaps is None or not self._lane.observes_next():
            return False
        self._sample_again()
        return True

    def _sample_again(self) -> None:
        """The lane's countdown to learning's next sample ended (it waits): start the next."""
        if self._gaps is not None:
            self._lane.observe_in(self._gaps.next())

    def observe(self, request: AllocationRequest) -> None:
        """Feed the learning hook the context of a request; one that fails extraction is
        skipped."""
        if self._learning is None:
            return
        try:
            context = self._extractor.extract(
                request.channel, request.context or {}, request.signals or {}, request.timestamp_ms
            )
        except AllocsvcError:
            return
        self._learning.observe(request.user_id, context)

    def observe_wire(self, request: bytes) -> None:
        """`observe` of a unary request on the wire format that `allocate_wire` answered: its
        features as Rust extracts them (a batch item's way): 1.6 µs with hot caches, against
        8.8 for parsing it with protobuf and extracting its context again in Python."""
        if self._learning is None:
            return
        row = self._catalogue.features_one(request, _now_ms())
        if row is not None:
            self._observe_rows((row,))

    def _observe_rows(self, rows: Iterable[Features]) -> None:
        """Feed the learning hook requests' features as Rust extracted them."""
        if self._learning is None:
            return
        observe = self._learning.observe_features
        for row in rows:
            observe(row[0], RawFeatures._make(row[1:]))

    def observe_batch(self, prepared: PreparedBatch, at_most: int) -> None:
        """Feed the learning hook a sample of a finished batch's items (about one in
        `observe_every`, at most `at_most`), as Rust extracted them; invalid items are left
        to `allocate`, which samples the items it answers."""
        if self._learning is None or self._gaps is None:
            return
        positions = self._gaps.sample(len(prepared), at_most)
        if not positions:
            return
        self._observe_rows(prepared.features(self._catalogue, positions))

    # Experiments ------------------------------------------------------------------------

    async def create_experiment(self, experiment: Experiment) -> Experiment:
        experiment = self._defaults.fill(experiment)
        self._defaults.check(experiment)
        validate(experiment, max_variants=self._limits.max_variants)
        if experiment.key in self._experiments:
            raise AlreadyExists(f"experiment {experiment.key!r} already exists")
        now = _now_ms()
        created = await self._journal.save_experiment(
            experiment.with_changes(created_at_ms=now, updated_at_ms=now), new=True
        )
        self._install(created)
        return created

    @property
    def defaults(self) -> SegmentationDefaults:
        return self._defaults

    def served_experiment(self, key: str) -> Experiment:
        """The experiment as allocation serves it (see `SegmentationDefaults.served`): its
        dimensions are the levels of its cascade and segment tree."""
        return self._served[self.get_experiment(key).handle]

    def get_experiment(self, key: str) -> Experiment:
        experiment = self._experiments.get(key)
        if experiment is None:
            raise NotFound(f"experiment {key!r} does not exist")
        return experiment

    def list_experiments(self, status: Status | None = None) -> list[Experiment]:
        found = (e for e in self._experiments.values() if status is None or e.status is status)
        return sorted(found, key=lambda e: e.key)

    async def update_experiment(self, key: str, changes: Mapping[str, object]) -> Experiment:
        current = self.get_experiment(key)
        unknown = set(changes) - UPDATABLE_FIELDS
        if unknown:
            raise InvalidRequest("update_mask", f"cannot update {', '.join(sorted(unknown))}")
        if "status" in changes:
            new_status = changes["status"]
            if new_status != current.status and new_status not in _TRANSITIONS[current.status]:
                raise FailedPrecondition(
                    f"experiment {key!r} cannot go from {current.status} to {new_status}"
                )
        if ("variants" in changes or "policy" in changes) and current.status is not Status.DRAFT:
            raise FailedPrecondition(
                f"experiment {key!r} is {current.status}: variants and policy change only in draft"
            )
        updated = current.with_changes(**changes, updated_at_ms=_now_ms())
        if "segmentation" in changes or "hierarchy" in changes:
            updated = self._defaults.fill(updated)
            self._defaults.check(updated)
        validate(updated, max_variants=self._limits.max_variants)
        saved = await self._journal.save_experiment(updated, new=False)
        self._install(saved)
        return saved

    def load_experiments(self, experiments: Iterable[Experiment]) -> None:
        """Install experiments read back from the store (at start, and as other replicas
        create or change them); unchanged ones are left alone."""
        for experiment in experiments:
            known = self._experiments.get(experiment.key)
            if known is None or known.updated_at_ms < experiment.updated_at_ms:
                self._install(experiment)

    def restore(
        self,
        experiments: Iterable[Experiment],
        counts: Sequence[tuple[int, int, int, int, int, float]],
        assignments: Iterable[Assignment],
        segments: Iterable[tuple[int, str]] = (),
    ) -> None:
        """Install state read back from the store at start (assignments oldest first;
        `segments` are the (experiment, key) pairs known to the store)."""
        self.load_experiments(experiments)
        self._engine.load_counts(list(counts))
        for handle, key in segments:
            self._register_segment(handle, key)
        self.hold_restored(assignments)

    def hold_copied(self, handle: int, data: bytes, at_start: bool) -> tuple[int, int, bool]:
        """Hold the assignments of experiment `handle` in a piece of a binary COPY stream of
        them read back from the store (oldest first; `HeldAssignments.add_copied`), as
        `hold_restored` does: (bytes read, assignments held, whether the stream ended)."""
        consumed, rows, keys, ended = self._held.add_copied(handle, data, at_start)
        for key in keys:
            self._register_segment(handle, key)
        return consumed, rows, ended

    def hold_block(self, data: bytes, made_ms: int) -> tuple[int, int]:
        """At a restart, take in an unexpanded block's rows after the table's
        (`HeldAssignments.add_block`): (rows, rows held)."""
        return self._held.add_block(data, made_ms)

    def unlisted(self, handles: Iterable[int]) -> None:
        """These experiments have stored assignments a restart did not read back: each user
        not held is looked up in the store until `list_stored_users` has listed them."""
        for handle in handles:
            self._held.unlisted(handle)

    async def list_stored_users(self, list_users: ListUsers) -> None:
        """List the stored users of the experiments `unlisted` named, one after another
        (`list_users(handle, list_copied)`: `PostgresJournal.list_users`): then only those
        users of theirs not held are looked up in the store, not every user not held. A call
        that fails goes on, when called again, from the experiment it failed on."""
        for handle in self._held.unlisted_experiments:
            started = time.perf_counter()
            rows = await list_users(handle, functools.partial(self._held.list_copied, handle))
            self._held.listed(handle)
            log.info(
                "stored users listed",
                extra={
                    "experiment": self.experiment_by_handle(handle).key,
                    "assignments": rows,
                    "seconds": round(time.perf_counter() - started, 3),
                    "filter_bytes": self._held.evicted_filter_size,
                },
            )

    async def renew_evicted_filter(self, store: StoredUsers) -> None:
        """Once the filter of evicted users is full (every user not held of an experiment
        that evicted is then looked up in the store, a query per new sticky user), start a new
        one and list into it every stored user of those experiments: the assignments made
        before are flushed first, then blocks and rows are read in one snapshot (a row is in
        its block or, expanded meanwhile, in the table). Until the listing ends those users
        are looked up, as with the full filter; a listing that fails (the store away) is
        tried again at the next call."""
        if not self._renewing:
            if not self._held.renew_filter():
                return
            self._renewing = True
            log.warning(
                "filter of evicted users full: renewing it from the stored users",
                extra={"evictions": self._held.evictions},
            )
        started = time.perf_counter()
        if not await store.flushed():
            raise Unavailable("assignment store unavailable: buffered assignments not written")
        handles = self._held.unlisted_experiments
        rows = await store.list_stored(handles, self._held.list_block, self._held.list_copied)
        for handle in handles:
            self._held.listed(handle)
        self._renewing = False
        log.info(
            "filter of evicted users renewed",
            extra={
                "experiments": len(handles),
                "assignments": rows,
                "seconds": round(time.perf_counter() - started, 3),
                "filter_bytes": self._held.evicted_filter_size,
            },
        )

    @property
    def unlisted_experiments(self) -> int:
        """Experiments whose stored users are still to be listed."""
        return len(self._held.unlisted_experiments)

    def hold_restored(self, assignments: Iterable[Assignment]) -> None:
        """Hold assignments read back from the store (oldest first), as `restore` does: past
        `held_capacity`, the oldest are evicted and looked up in the store when needed."""
        for a in assignments:
            self._remember(a)
            self._register_segment(a.handle, a.segment_key)

    def _counted_lookups(self, asked: int, found: int) -> None:
        self._store_lookups += asked
        self._store_lookups_found += found

    def held_statistics(self) -> dict[str, int]:
        """The held store's numbers: assignments held and the most it holds (0: no bound),
        evictions so far, the evicted keys' filter (bytes; full: 1 when it passes every key),
        experiments whose stored users are still to be listed after a restart, and the users
        and ids looked up in the durable store because memory may not hold them (and how many
        it had)."""
        held = self._held
        return {
            "assignments": len(held),
            "capacity": self._limits.max_held_assignments,
            "evictions": held.evictions,
            "evicted_filter_bytes": held.evicted_filter_size,
            "evicted_filter_full": int(held.evicted_filter_full),
            "unlisted_experiments": self.unlisted_experiments,
            "store_lookups": self._store_lookups,
            "store_lookups_found": self._store_lookups_found,
        }

    @property
    def held_capacity(self) -> int:
        """How many assignments memory holds at most (0: no bound)."""
        return self._limits.max_held_assignments

    def take_deltas(self) -> list[tuple[int, int, int, int, int, float]]:
        """Counter changes since the last call (for write-behind)."""
        return self._engine.take_deltas()

    def replace_counts(self, rows: list[tuple[int, int, int, int, int, float]]) -> None:
        """Adopt merged totals from other replicas (this replica's untaken deltas stay);
        they are the region's own totals, so other regions' offset is added back."""
        remote = self._remote
        if remote:
            rows = [
                (e, s, v, a + r[0], k + r[1], x + r[2])
                for e, s, v, a, k, x in rows
                for r in (remote.get((e, s, v), (0, 0, 0.0)),)
            ]
        self._engine.load_counts(rows, replace=True)

    def snapshot(self, handle: int) -> list[tuple[int, int, int, int, int, float]]:
        """Totals as decisions see them (with several regions: global counts)."""
        return self._engine.snapshot(handle)

    def allocations(self, handle: int) -> int:
        """The experiment's allocations so far (its global node, all variants)."""
        return sum(a for a, _, _ in self._engine.counts(handle, ""))

    def own_snapshot(self, handle: int) -> list[tuple[int, int, int, int, int, float]]:
        """This region's own totals (the snapshot without other regions' counts)."""
        remote = self._remote
        if not remote:
            return self._engine.snapshot(handle)
        out = []
        for e, s, v, a, k, x in self._engine.snapshot(handle):
            ra, rk, rx = remote.get((e, s, v), (0, 0, 0.0))
            if (a - ra, k - rk) != (0, 0) or x != rx:
                out.append((e, s, v, a - ra, k - rk, x - rx))
        return out

    def set_remote_counts(self, rows: Iterable[tuple[str, int, int, int, int, float]]) -> int:
        """Global posteriors: make decisions count other regions' traffic too. `rows` are
        the latest totals of every other region summed, as (experiment key, segment hash
        (signed or not), variant, allocations, conversions, value sum); they replace the
        previous offset. Only the difference is added to the engine's totals (wrapping
        arithmetic, so an offset may shrink), never to the deltas this region persists.
        Returns how many rows were applied."""
        new: dict[tuple[int, int, int], tuple[int, int, float]] = {}
        for key, segment_hash, variant, a, k, x in rows:
            experiment = self._experiments.get(key)
            if experiment is None or not 0 <= variant < len(experiment.variants):
                continue
            new[(experiment.handle, segment_hash % 2**64, variant)] = (a, k, x)
        diff = []
        for node in new.keys() | self._remote.keys():
            a, k, x = new.get(node, (0, 0, 0.0))
            oa, ok, ox = self._remote.get(node, (0, 0, 0.0))
            if (a, k, x) != (oa, ok, ox):
                diff.append((*node, (a - oa) % 2**64, (k - ok) % 2**64, x - ox))
        self._remote = new
        if diff:
            self._engine.load_counts(diff)
        return len(new)

    def experiment_handles(self) -> list[int]:
        return list(self._by_handle)

    def _install(self, experiment: Experiment) -> None:
        served = self._defaults.served(experiment)
        configure_engine(self._engine, served)
        self._experiments[experiment.key] = experiment
        self._by_handle[experiment.handle] = experiment
        self._served[experiment.handle] = served
        self._held.name(experiment.handle, experiment.key)
        self._register_segment(experiment.handle, "")
        if self._global_until_first_tree and experiment.handle not in self._with_tree:
            self._engine.set_tree(experiment.handle, [])
        self._catalogue.put(
            experiment.key,
            handle=experiment.handle,
            running=experiment.status is Status.RUNNING,
            sticky=experiment.sticky,
            caller_segments=served.segmentation.mode is SegmentationMode.AUTO,
            dimensions=list(served.dimensions),
            variants=[(v.key, v.name, v.payload_json) for v in experiment.variants],
        )

    def _running(self, key: str) -> Experiment:
        if not key:
            raise InvalidRequest("experiment_id", "must not be empty")
        experiment = self._experiments.get(key)
        if experiment is None:
            if len(key) > 128:
                raise InvalidRequest("experiment_id", "longer than 128 characters")
            raise NotFound(f"experiment {key!r} does not exist")
        if experiment.status is not Status.RUNNING:
            raise FailedPrecondition(f"experiment {key!r} is {experiment.status}, not running")
        return experiment

    def _check_user(self, user_id: str) -> None:
        if not user_id:
            raise InvalidRequest("user_id", "must not be empty")
        if len(user_id) > self._limits.max_user_id_chars:
            raise InvalidRequest(
                "user_id", f"longer than {self._limits.max_user_id_chars} characters"
            )
        _no_nul("user_id", user_id)

    # Allocation -------------------------------------------------------------------------

    async def allocate(self, request: AllocationRequest) -> Allocation:
        """Which variant this user sees; sticky users get their earlier assignment.

        Without shared state this does no I/O. With it, only a user of a sticky experiment
        this replica has not seen costs a round trip: the claim of the new assignment, which
        answers another replica's instead if there is one (concurrent calls' claims go to
        Redis together).
        """
        experiment = self._running(request.experiment_key)
        self._check_user(request.user_id)
        context = self._extractor.extract(
            request.channel,
            request.context or {},
            request.signals or {},
            request.timestamp_ms,
        )
        # Most requests stop at the decrement; learning sees about one in gaps.every.
        if self.observes_next() and self._learning is not None:
            self._learning.observe(request.user_id, context)
        slot = (experiment.handle, request.user_id)
        if experiment.sticky:
            earlier = self._latest_of(slot) or await self._recall(experiment, request.user_id)
            if earlier is None and self._shared is not None and not self._journal.has_room(1):
                # A new assignment would be refused: answer the user's from elsewhere, if any.
                earlier = await self._shared.sticky(experiment.handle, request.user_id)
                if earlier is not None:
                    self._remember(earlier)
            if earlier is not None:
                return Allocation(earlier, experiment.variants[earlier.variant], sticky=True)
        served = self._served[experiment.handle]
        if served.segmentation.mode is SegmentationMode.AUTO:
            # The nearest centroid of the cached clustering model: arithmetic, no I/O.
            values: Sequence[str] = (
                (NO_CLUSTER,) if self._learning is None else (self._learning.cluster_of(context),)
            )
        else:
            values = context.dimensions(served.dimensions)
        # Refused before deciding when the write-behind is full, so nothing is counted twice.
        self._journal.admit(1)
        # A shared sticky decision counts only once its claim stands (another replica may win).
        claiming = self._shared is not None and experiment.sticky
        variant, level, propensity, segment_key = self._engine.decide(
            experiment.handle, request.user_id, values, record=not claiming
        )
        assignment = Assignment(
            id=f"{self._id_prefix}-{self._lane.take_seqs(1):x}",
            experiment_key=experiment.key,
            handle=experiment.handle,
            user_id=request.user_id,
            variant=variant,
            segment_key=segment_key,
            cascade_level=level,
            propensity=propensity,
            created_ms=_now_ms(),
        )
        if claiming:
            # Kept even if the call is cancelled meanwhile: its claim may stand in Redis.
            return await asyncio.shield(self._claim(experiment, assignment))
        if self._shared is not None:
            self._shared.assignment_made(assignment)
        self._keep(assignment)
        return Allocation(assignment, experiment.variants[variant], sticky=False)

    async def _claim(self, experiment: Experiment, assignment: Assignment) -> Allocation:
        """Claim a new assignment of a sticky experiment in shared state; count and keep it if
        it stands, else answer the one that does."""
        assert self._shared is not None
        standing = await self._shared.claim(assignment)
        if standing.id != assignment.id:
            # Another replica answered this user first: its answer stands.
            self._remember(standing)
            return Allocation(standing, experiment.variants[standing.variant], sticky=True)
        self._engine.record_allocation(
            assignment.handle, assignment.segment_key, assignment.variant
        )
        self._keep(assignment)
        return Allocation(assignment, experiment.variants[assignment.variant], sticky=False)

    def _keep(self, assignment: Assignment) -> None:
        """What a new assignment leaves behind: the indexes, the write-behind, then `_count`."""
        self._remember(assignment)
        self._journal.assignment_made(assignment)
        self._count(assignment.handle, assignment.segment_key, assignment.cascade_level)

    def _count(self, handle: int, segment_key: str, level: int) -> None:
        """A new assignment's segments, cascade count and growth count."""
        self._register_segment(handle, segment_key)
        self._cascade_allocations[(handle, level)] += 1
        if self._on_growth is not None:
            self._grown_handles.add(handle)
            self._grown(1)

    def allocate_wire(self, request: bytes, region: str) -> bytes | None:
        """Unary Allocate on the wire format in one Rust call (decoding, checks, context
        extraction, the sticky answer or the decision, encoding; with a log, holding,
        logging and counting the new assignment): the serialized AllocateResponse, or None
        when `allocate` must answer (a bad request, whose error it words; `auto`
        segmentation; a sticky user this replica does not hold, under shared state: its
        claim; a full write-behind buffer, under which `allocate` still answers returning
        users). Learning observes a sample of the calls it answers, as it does `allocate`'s."""
        # With a log, Rust checks the write-behind's room itself (the journal shares it).
        if self._log is None and not self._journal.has_room(1):
            return None
        now = _now_ms()
        out = self._allocate_one(request, now, region)
        if isinstance(out, bytes):
            return out  # nothing left to do: most calls
        return self._after_unary(request, now, out, region)

    def unary_path(self, region: str) -> Callable[[bytes], bytes | None]:
        """`allocate_wire` for `region` as one callable, for a server's unary `Allocate`. With
        a log, a Rust method (`UnaryPath`) that reads the clock itself and calls back into
        Python only for what `_after_unary` does: most calls run no Python of ours."""
        if self._log is None:
            return functools.partial(self.allocate_wire, region=region)
        return UnaryPath(
            self._catalogue,
            self._engine,
            self._held,
            self._lane,
            self._log,
            region,
            self._after_unary,
        ).allocate

    def _allocate_one(self, request: bytes, now: int, region: str) -> UnaryOutcome:
        return self._catalogue.allocate_one(
            self._engine,
            request,
            self._held,
            self._lane,
            self._log,
            now,
            self._shared is not None,
            region,
        )

    def _after_unary(
        self, request: bytes, now: int, out: UnaryOutcome, region: str
    ) -> bytes | None:
        """What is left of a call whose `allocate_one` answered more than its response: None
        (the caller's path answers), a user agent to classify before it decides, or a tuple
        (`_after_rust`)."""
        if isinstance(out, str):
            # A user agent Rust has not classified yet: classify it once, then decide.
            self._catalogue.learn_devices([(out, self._extractor.device(out))])
            out = self._allocate_one(request, now, region)
        if out is None or isinstance(out, str):
            return None
        if isinstance(out, bytes):
            return out
        return self._after_rust(request, now, out)

    def _after_rust(
        self,
        request: bytes,
        now: int,
        out: UnaryFollowUp,
    ) -> bytes:
        """What is left to do of a call `allocate_one` answered: the rare calls of a new
        segment key, a growth report or a learning sample; every new assignment of a replica,
        which shares and counts it here."""
        if len(out) == 2:
            response, kept = out
            self._keep_wire(now, kept)
            if self.observes_next():
                self.observe_wire(request)
            return response
        response, new_key, grow, features = out
        if new_key is not None:
            self._register_segment(*new_key)
        if grow:
            self._grown(0)
        if features is not None:
            self._sample_again()
            self._observe_rows((features,))
        return response

    def _keep_wire(self, now: int, kept: tuple[int, int, str, int, str, int, float]) -> None:
        """`_keep` of the assignment `allocate_wire` made without a log (a replica, which
        shares each one, or a journal that needs each one passed)."""
        seq, handle, user_id, variant, segment_key, level, propensity = kept
        assignment = Assignment(
            f"{self._id_prefix}-{seq:x}",
            self._by_handle[handle].key,
            handle,
            user_id,
            variant,
            segment_key,
            level,
            propensity,
            now,
        )
        if self._shared is not None:
            self._shared.assignment_made(assignment)
        self._keep(assignment)

    def _register_segment(self, handle: int, segment_key: str) -> None:
        known = self._segments.setdefault(handle, {})
        if segment_key not in known:
            for key in parent_keys(segment_key):
                known.setdefault(key, key_hash(key))

    def segment_keys(self, handle: int) -> list[tuple[str, int]]:
        """(key, hash) of every segment this process has seen for the experiment."""
        return list(self._segments.get(handle, {}).items())

    def cascade_counts(self, handle: int) -> dict[int, tuple[int, int]]:
        """Allocations and conversions per cascade level of the experiment, since start."""
        allocations = Counter(
            {lv: n for (h, lv), n in self._cascade_allocations.items() if h == handle}
        )
        allocations.update(dict(self._lane.level_counts(handle)))
        return {
            lv: (allocations[lv], self._cascade_conversions[(handle, lv)])
            for lv in sorted(allocations)
        }

    def set_tree(self, handle: int, nodes: list[int] | None) -> None:
        self._engine.set_tree(handle, nodes)
        self._with_tree.add(handle)

    def global_until_first_tree(self) -> None:
        """Serve every experiment without a tree from its global node only, now and as
        experiments are installed, until `set_tree` gives it one.

        SPEC §4: the cascade uses the deepest node present in the current tree; before the
        first tree none is present below global. For servers whose trees are rebuilt
        automatically; without rebuilds an experiment keeps every node (no tree at all).
        """
        self._global_until_first_tree = True
        for handle in self._by_handle:
            if handle not in self._with_tree:
                self._engine.set_tree(handle, [])

    def experiment_by_handle(self, handle: int) -> Experiment:
        experiment = self._by_handle.get(handle)
        if experiment is None:
            raise NotFound(f"experiment #{handle} does not exist")
        return experiment

    def _remember(self, assignment: Assignment) -> None:
        self._held.add(assignment)

    async def _recall(self, experiment: Experiment, user_id: str) -> Assignment | None:
        """The user's latest assignment in the experiment from the durable store, when memory
        may have evicted it (held again if found)."""
        if not self._held.may_be_stored([experiment.handle], [user_id]):
            return None
        return (await self._recall_users(experiment, [user_id])).get(user_id)

    async def _recall_users(
        self, experiment: Experiment, user_ids: Sequence[str]
    ) -> dict[str, Assignment]:
        """The latest assignments in the experiment of these users that the durable store has,
        by user, held again (unless one was made meanwhile)."""
        found = await self._journal.stored_latest(experiment, user_ids)
        self._counted_lookups(len(user_ids), len(found))
        for user_id, assignment in found.items():
            if self._latest_of((experiment.handle, user_id)) is None:
                self._remember(assignment)
        return found

    async def recall_sticky(self, prepared: PreparedBatch) -> Recalled:
        """The evicted assignments of a batch's users of sticky experiments, read from the
        durable store (one call per experiment) and held again, for `finish_batch`: a batch
        may recall more than memory holds, so they are answered from here, not the held
        store."""
        # The batch first: the store's counts wait for the batches it is still holding.
        if not prepared.has_sticky or not self._held.incomplete:
            return {}
        _, handles, user_ids = prepared.sticky_candidates()
        wanted: dict[int, list[str]] = {}
        for i in self._held.may_be_stored(handles, user_ids):
            wanted.setdefault(handles[i], []).append(user_ids[i])
        recalled: Recalled = {}
        for handle, users in wanted.items():
            found = await self._recall_users(self._by_handle[handle], users)
            recalled.update(((handle, user_id), a) for user_id, a in found.items())
        return recalled

    def _latest_of(self, slot: tuple[int, str]) -> Assignment | None:
        held = self._held.latest(*slot)
        return None if held is None else Assignment._make(held)

    def _by_id_of(self, assignment_id: str) -> Assignment | None:
        held = self._held.by_id(assignment_id)
        return None if held is None else Assignment._make(held)

    async def allocate_many(
        self, requests: Sequence[AllocationRequest]
    ) -> list[Allocation | AllocsvcError]:
        """Allocate each request on its own: one bad item does not fail the others."""
        results: list[Allocation | AllocsvcError] = []
        for request in requests:
            try:
                results.append(await self.allocate(request))
            except AllocsvcError as exc:
                results.append(exc)
        return results

    def prepare_batch(self, request: bytes) -> PreparedBatch | None:
        """Decode a serialized AllocateBatchRequest and check its items in Rust.

        None when an item needs the per-item path (`auto` segmentation): `allocate_many`
        then. A batch `claims` names is finished by `finish_shared_batch`, others by
        `finish_batch`.
        """
        try:
            prepared = self._catalogue.prepare(request, _now_ms())
        except ValueError as exc:
            raise InvalidRequest("requests", f"not a valid AllocateBatchRequest: {exc}") from None
        self.check_batch(len(prepared))
        return None if prepared.needs_caller else prepared

    def finish_batch(
        self,
        prepared: PreparedBatch,
        region: str,
        allocated: Mapping[int, Allocation],
        errors: Mapping[int, tuple[int, str, str]],
        recalled: Recalled | None = None,
    ) -> bytes:
        """Allocate the items of a prepared batch exactly as `allocate` would, in order, in one
        Rust call; return the serialized AllocateBatchResponse.

        `allocated` and `errors` answer the items `prepared.invalid()` lists (the caller ran
        them through `allocate`). Sticky users held here or `recalled` (`recall_sticky`) are
        answered with their assignment.
        """
        given = self._given(prepared, allocated, prepared.sticky_candidates(), recalled or {})
        response, made, _ = self._decide_new(prepared, region, given, errors, record=True)
        if made:
            self._keep_made(made)
        return response

    def _decide_new(
        self,
        prepared: PreparedBatch,
        region: str,
        given: Mapping[int, GivenAllocation],
        errors: Mapping[int, tuple[int, str, str]],
        *,
        record: bool,
    ) -> tuple[bytes, MadeAssignments, list[int]]:
        """`_decided` with this service's next ids, once the journal has admitted as many new
        assignments as the batch may make."""
        # At most this many are new (repeated sticky users are fewer): refused before deciding.
        self._journal.admit(len(prepared) - len(errors) - len(given))
        first = self._lane.take_seqs(0)
        decided = self._decided(prepared, region, first, given, errors, record=record)
        self._lane.take_seqs(len(decided[1]))
        return decided

    def _decided(
        self,
        prepared: PreparedBatch,
        region: str,
        first: int,
        given: Mapping[int, GivenAllocation],
        errors: Mapping[int, tuple[int, str, str]],
        *,
        record: bool,
    ) -> tuple[bytes, MadeAssignments, list[int]]:
        """`PreparedBatch.finish` with this service's engine, catalogue, held store and id
        prefix, ids from `first` on, made now."""
        return prepared.finish(
            self._engine,
            self._catalogue,
            self._held,
            region=region,
            id_prefix=self._id_prefix,
            first_seq=first,
            now_ms=_now_ms(),
            given=given,
            errors=errors,
            record=record,
        )

    def claims(self, prepared: PreparedBatch) -> bool:
        """Whether the batch's new assignments are claimed in shared state before they count
        (`finish_shared_batch`): items of sticky experiments, on a replica sharing state."""
        return self._shared is not None and prepared.has_sticky

    async def finish_shared_batch(
        self,
        prepared: PreparedBatch,
        region: str,
        allocated: Mapping[int, Allocation],
        errors: Mapping[int, tuple[int, str, str]],
        recalled: Recalled | None = None,
    ) -> bytes:
        """`finish_batch` for a batch `claims` names, in two round trips to shared state
        whatever its size (`allocate` takes one per new user): users of sticky experiments not
        held here are looked up there, the rest decided without counting and their new
        assignments claimed. A user another replica answered first meanwhile gets that answer
        (as `allocate` does); only the claims that stand are counted, held and kept."""
        shared = self._shared
        assert shared is not None
        candidates = prepared.sticky_candidates()
        _, handles, users = candidates
        held = self._held.latest_many(handles, users)
        missing = [
            (h, u) for k, (h, u) in enumerate(zip(handles, users, strict=True)) if k not in held
        ]
        found = await shared.sticky_many(missing)
        for assignment in found.values():
            self._remember(assignment)
        given = self._given(prepared, allocated, candidates, {**(recalled or {}), **found})
        response, made, answers = self._decide_new(prepared, region, given, errors, record=False)
        if not made:
            return response
        # Kept even if the call is cancelled meanwhile: its claims may stand in shared state.
        claiming = self._claim_made(
            prepared, region, given, errors, (response, made, answers), set(handles)
        )
        return await asyncio.shield(claiming)

    async def _claim_made(
        self,
        prepared: PreparedBatch,
        region: str,
        given: Mapping[int, GivenAllocation],
        errors: Mapping[int, tuple[int, str, str]],
        decided: tuple[bytes, MadeAssignments, Sequence[int]],
        sticky: set[int],
    ) -> bytes:
        """Claim the new assignments of `decided` (`finish`'s response, assignments
        and the items they answer) of the `sticky` experiments; count, hold and keep those that
        stand; return the response, answered again if one did not."""
        assert self._shared is not None
        response, made, answers = decided
        standing = await self._shared.claim_made(made, sticky)
        if standing:
            for found in standing.values():
                self._remember(found)
            # Each new assignment answered as decided, but where a claim did not stand, with
            # the assignment that stands.
            again = dict(given)
            for k, (i, held) in enumerate(zip(answers, made.assignments(), strict=True)):
                lost = k in standing
                a = standing[k] if lost else Assignment._make(held)
                again[i] = (a.id, a.variant, a.segment_key, a.cascade_level, a.propensity, lost)
            response, _, _ = self._decided(prepared, region, 0, again, errors, record=False)
            made = made.without(list(standing))
        self._engine.record_made(made)
        self._held.hand_over(made)
        self._keep_made(made)
        return response

    def _given(
        self,
        prepared: PreparedBatch,
        allocated: Mapping[int, Allocation],
        candidates: tuple[list[int], list[int], list[str]],
        recalled: Recalled,
    ) -> dict[int, GivenAllocation]:
        """What the caller answers of a prepared batch: the items it allocated itself, and
        the users of sticky experiments (`candidates`: `prepared.sticky_candidates()`) held
        here or else `recalled` (held again, but perhaps evicted since by one another),
        answered with their assignment."""
        unknown = prepared.unknown_user_agents(self._catalogue)
        if unknown:
            device = self._extractor.device
            self._catalogue.learn_devices([(ua, device(ua)) for ua in unknown])
        given = {
            i: (
                a.assignment.id,
                a.assignment.variant,
                a.assignment.segment_key,
                a.assignment.cascade_level,
                a.assignment.propensity,
                a.sticky,
            )
            for i, a in allocated.items()
        }
        positions, handles, user_ids = candidates
        earlier = {
            k: Assignment._make(a) for k, a in self._held.latest_many(handles, user_ids).items()
        }
        if recalled:
            for k, slot in enumerate(zip(handles, user_ids, strict=True)):
                if k not in earlier and slot in recalled:
                    earlier[k] = recalled[slot]
        for k, a in earlier.items():
            if positions[k] not in given:
                given[positions[k]] = (
                    a.id,
                    a.variant,
                    a.segment_key,
                    a.cascade_level,
                    a.propensity,
                    True,
                )
        return given

    def _keep_made(self, made: MadeAssignments) -> None:
        """What `_keep` does, for a batch's new assignments (held already, by Rust): work per
        distinct segment key and cascade level, none per assignment."""
        self._journal.assignments_made(made)
        segments = self._segments
        for handle, key in made.distinct_keys():
            if key not in segments.get(handle, ()):
                self._register_segment(handle, key)
        if self._shared is not None:
            self._shared.assignments_made(made)
        levels = made.level_counts()
        for slot, n in levels:
            self._cascade_allocations[slot] += n
        if self._on_growth is not None:
            self._grown_handles.update(handle for (handle, _), _ in levels)
            self._grown(len(made))

    def check_batch(self, size: int) -> None:
        """A batch RPC's item count must be within 1..max_batch_items."""
        if size == 0:
            raise InvalidRequest("requests", "must not be empty")
        if size > self._limits.max_batch_items:
            raise InvalidRequest(
                "requests", f"{size} items, at most {self._limits.max_batch_items}"
            )

    # Conversions ------------------------------------------------------------------------

    async def _assignment_for(self, request: ConversionRequest) -> Assignment:
        if request.assignment_id:
            if len(request.assignment_id) > 128:
                raise InvalidRequest("assignment_id", "longer than 128 characters")
            found = self._by_id_of(request.assignment_id)
            stored_first = self._held.incomplete
            if found is None and stored_first:
                found = await self._stored_by_id(request.assignment_id)
            if found is None and self._shared is not None:
                found = await self._shared.assignment(request.assignment_id)
                if found is not None and found.handle in self._by_handle:
                    self._held.add(found, latest=False)
                else:
                    found = None
                if found is None and not stored_first:
                    # Another replica's, whose record Redis has not (it was down, or the
                    # record was dropped meanwhile): the durable store has it once written.
                    found = await self._stored_by_id(request.assignment_id)
            if found is None:
                raise NotFound(f"assignment {request.assignment_id!r} does not exist")
            return found
        if not request.experiment_key:
            raise InvalidRequest(
                "assignment_id", "give an assignment_id, or experiment_id and user_id"
            )
        experiment = self._experiments.get(request.experiment_key)
        if experiment is None:
            raise NotFound(f"experiment {request.experiment_key!r} does not exist")
        self._check_user(request.user_id)
        found = self._latest_of((experiment.handle, request.user_id))
        if found is None:
            found = await self._recall(experiment, request.user_id)
        if found is None and self._shared is not None:
            found = await self._shared.sticky(experiment.handle, request.user_id)
            if found is not None:
                self._remember(found)
        if found is None:
            raise NotFound(
                f"user {request.user_id!r} has no assignment in {request.experiment_key!r}"
            )
        return found

    async def _stored_by_id(self, assignment_id: str) -> Assignment | None:
        """The assignment by id as the durable store has it, held from now on; counted as a
        store lookup."""
        found = await self._journal.stored_assignment(assignment_id, self._by_handle)
        self._counted_lookups(1, int(found is not None))
        if found is not None:
            self._held.add(found, latest=False)
        return found

    async def _conversion(self, request: ConversionRequest) -> Conversion:
        if not math.isfinite(request.value) or request.value < 0:
            raise InvalidRequest("value", "must be a finite number >= 0")
        if len(request.idempotency_key) > 128:
            raise InvalidRequest("idempotency_key", "longer than 128 characters")
        _no_nul("idempotency_key", request.idempotency_key)
        _no_nul("assignment_id", request.assignment_id)
        assignment = await self._assignment_for(request)
        return Conversion(
            assignment_id=assignment.id,
            handle=assignment.handle,
            variant=assignment.variant,
            segment_key=assignment.segment_key,
            user_id=assignment.user_id,
            value=request.value,
            idempotency_key=request.idempotency_key,
        )

    async def record_conversion(self, request: ConversionRequest) -> ConversionResult:
        result = (await self.record_conversions([request]))[0]
        if isinstance(result, AllocsvcError):
            raise result
        return result

    async def record_conversions(
        self, requests: Sequence[ConversionRequest]
    ) -> list[ConversionResult | AllocsvcError]:
        """Record conversions; answered only once the journal holds them durably.

        A repeat of (assignment, idempotency key) is acknowledged with `counted=False` and
        changes nothing. Each conversion counts at every level of its assignment's path.
        """
        results: list[ConversionResult | AllocsvcError] = []
        pending: list[tuple[int, Conversion]] = []
        for request in requests:
            try:
                pending.append((len(results), await self._conversion(request)))
                results.append(AllocsvcError())  # placeholder until the journal answers
            except AllocsvcError as exc:
                results.append(exc)
        if not pending:
            return results
        counted = await self._journal.record_conversions([c for _, c in pending])
        for (position, conversion), is_new in zip(pending, counted, strict=True):
            assignment = self._by_id_of(conversion.assignment_id)
            if assignment is None:
                # Erased (data protection) while the conversion was being stored.
                results[position] = NotFound(
                    f"assignment {conversion.assignment_id!r} does not exist"
                )
                continue
            if is_new:
                self._engine.record_conversion(
                    conversion.handle, conversion.segment_key, conversion.variant, conversion.value
                )
                self._cascade_conversions[(assignment.handle, assignment.cascade_level)] += 1
            experiment = self._by_handle[assignment.handle]
            results[position] = ConversionResult(
                assignment, experiment.variants[assignment.variant], counted=is_new
            )
        return results

    def assignment(self, assignment_id: str) -> Assignment | None:
        return self._by_id_of(assignment_id)

    def holds(self, assignment_id: str = "", experiment_key: str = "", user_id: str = "") -> bool:
        """Whether this process holds the assignment (by id, or the user's in the experiment)."""
        if assignment_id:
            return self._held.has_id(assignment_id)
        experiment = self._experiments.get(experiment_key)
        return experiment is not None and self._held.has_latest(experiment.handle, user_id)

    def user_assignments(self, user_id: str) -> list[Assignment]:
        """Every assignment of this user held in this process (data-protection export)."""
        return sorted(map(Assignment._make, self._held.of_user(user_id)), key=_made_at)

    def held_user_ids(self) -> set[str]:
        """Every user id this process holds an assignment of (erasures from other processes
        are matched against these)."""
        return set(self._held.user_ids())

    def forget_user(self, user_id: str) -> list[Assignment]:
        """Drop the user's assignments from memory (erasure): the next allocation treats the
        user as new. Counts stay: they are anonymous aggregates."""
        return sorted(map(Assignment._make, self._held.forget_user(user_id)), key=_made_at)

    def policy_of(self, key: str) -> Policy:
        return self.get_experiment(key).policy
