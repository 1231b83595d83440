"""The durable journal: experiments written through, allocations written behind, conversions
group-committed.

- Assignments and allocation counts are buffered in memory and flushed in batches at least
  every `flush_interval` (the server's `write_behind_interval`, 100 ms by default). A crash
  loses at most that window of them; they were never promised durable.
- A conversion is acknowledged only after the transaction that stores it (and increments its
  counters at every level of its path) has committed. Concurrent conversions wait together on
  one transaction a few milliseconds long (group commit). The unique (assignment, idempotency
  key) constraint makes a retry after a crash count zero times, never twice.
- Conversion counts reach Postgres only through that transaction, so the write-behind flush
  writes allocation deltas only.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import asyncpg

from allocsvc.allocation.experiments import (
    Experiment,
    Exploration,
    Hierarchy,
    Policy,
    Segmentation,
    SegmentationMode,
    Status,
    Variant,
)
from allocsvc.allocation.journal import (
    Conversion,
    StoredRecommendation,
    TreeNodeRecord,
    assignment_parts,
)
from allocsvc.allocation.service import Assignment
from allocsvc.analytics import DailyTraffic
from allocsvc.core import (
    AssignmentLog,
    MadeAssignments,
    assignment_block,
    copy_assignments,
    key_hash,
    parent_keys,
)
from allocsvc.errors import AlreadyExists, ResourceExhausted, Unavailable
from allocsvc.store.postgres import (
    AssignmentBlock,
    AssignmentRow,
    ConflictError,
    ConversionRow,
    CountRow,
    ExperimentRow,
    HierarchyRow,
    PostgresStore,
    RecommendationRow,
    SegmentRow,
    VariantRow,
    WriteBehind,
    datetime_of_ms,
)
from allocsvc.store.rounds import Rounds
from allocsvc.tasks.scheduler import stop_tasks

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# The expander's tick: the flush interval, at most this (a longer `write_behind_interval`
# widens what a crash may lose, not how soon blocks are expanded).
_EXPAND_TICK_S = 0.1
# The expander looks for other processes' blocks every this many ticks, and waits this long
# after a failed expansion.
_BLOCK_LOOK_TICKS = 50
_BLOCK_RETRY_S = 1.0
# Assignments per block, about (a batch's are not split): a lookup of a user in a block reads
# the whole block, about 4 ms for 20,000 on the embedded server (expanding it, which lookups
# did before, about 0.15-0.2 s; one block of a 200,000 flush 1.6-1.9 s; bench/RESULTS.md items
# 27 and 28).
BLOCK_MAX_ROWS = 20_000
# Blocks are expanded once no process wrote one for this long (they come every flush interval
# while some replica's batches are past what rows take).
BLOCK_QUIET_S = 1.0
# The analytics view is refreshed again no sooner than this many times as long as its last
# refresh took (at 5,000,000 counters, 56-153 s on the embedded server).
_REFRESH_SPACING = 5

# Failures that mean "the database is not reachable right now" (57P01-03: it is shutting
# down or starting up).
STORE_DOWN = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,
    TimeoutError,
)


def experiment_row(e: Experiment) -> ExperimentRow:
    return ExperimentRow(
        key=e.key,
        name=e.name,
        description=e.description,
        status=e.status.value,
        policy=e.policy.value,
        config={
            "segmentation": {
                "mode": e.segmentation.mode.value,
                "segment_by": list(e.segmentation.segment_by),
                "min_samples_per_segment": e.segmentation.min_samples_per_segment,
                "auto_activation": e.segmentation.auto_activation,
                "auto_activation_threshold": e.segmentation.auto_activation_threshold,
            },
            "hierarchy": {
                "min_samples_per_level": list(e.hierarchy.min_samples_per_level),
                "max_depth": e.hierarchy.max_depth,
                "warm_start_strength": e.hierarchy.warm_start_strength,
            },
            "exploration": e.exploration.value,
        },
        sticky=e.sticky,
        variants=[
            VariantRow(
                index=i,
                key=v.key,
                name=v.name,
                weight=v.weight,
                payload={"json": v.payload_json} if v.payload_json else {},
            )
            for i, v in enumerate(e.variants)
        ],
        id=e.handle or None,
        propensity_floor=e.propensity_floor,
    )


def experiment_from_row(row: ExperimentRow) -> Experiment:
    seg: dict[str, Any] = row.config.get("segmentation", {})
    hier: dict[str, Any] = row.config.get("hierarchy", {})
    return Experiment(
        key=row.key,
        name=row.name,
        description=row.description,
        status=Status(row.status),
        policy=Policy(row.policy),
        variants=tuple(
            Variant(v.key, v.name, v.weight, str(v.payload.get("json", "")))
            for v in sorted(row.variants, key=lambda v: v.index)
        ),
        segmentation=Segmentation(
            mode=SegmentationMode(seg.get("mode", "disabled")),
            segment_by=tuple(seg.get("segment_by", ())),
            min_samples_per_segment=int(seg.get("min_samples_per_segment", 0)),
            auto_activation=bool(seg.get("auto_activation", False)),
            auto_activation_threshold=int(seg.get("auto_activation_threshold", 1000)),
        ),
        hierarchy=Hierarchy(
            min_samples_per_level=tuple(hier.get("min_samples_per_level", ())),
            max_depth=int(hier.get("max_depth", 0)),
            warm_start_strength=float(hier.get("warm_start_strength", 10.0)),
        ),
        exploration=Exploration(row.config.get("exploration", "default")),
        propensity_floor=row.propensity_floor,
        sticky=row.sticky,
        handle=row.id or 0,
        created_at_ms=_ms(row.created_at),
        updated_at_ms=_ms(row.updated_at),
    )


def _ms(moment: Any) -> int:
    return int(moment.timestamp() * 1000) if moment is not None else 0


class Restoring(Protocol):
    """What a restart holds the stored assignments in (`AllocationService`)."""

    def hold_copied(self, handle: int, data: bytes, at_start: bool) -> tuple[int, int, bool]:
        """Hold the rows of experiment `handle` in a piece of a binary COPY stream (oldest
        first): (bytes read, rows, whether the stream ended)."""
        ...

    def unlisted(self, handles: Iterable[int]) -> None:
        """These experiments have stored rows not read."""
        ...

    def hold_block(self, data: bytes, made_ms: int) -> tuple[int, int]:
        """Take in a compressed block's rows, after the table's: (rows, rows held)."""
        ...


@dataclass
class Restored:
    """What `hold_newest` read: assignments held (from the table and from blocks), the
    experiments with rows in the table not read, the blocks read and their rows."""

    held: int = 0
    unread: list[int] = field(default_factory=list)
    blocks: int = 0
    block_rows: int = 0


class CopyPieces:
    """A binary COPY stream as PostgreSQL sends it, piece by piece, to a reader of whole rows
    (`read(data, at_start)` -> (bytes read, rows, ended)): the unread end of a piece, a row cut
    off, goes again at the front of the next.

    `feed` never raises: asyncpg answers an exception of its output by cancelling the COPY, and
    that cancellation did not end here (the embedded server, over a Unix socket). The first
    error is kept, what follows it is dropped, and `finish` raises it once the COPY is over."""

    def __init__(self, read: Callable[[bytes, bool], tuple[int, int, bool]]) -> None:
        self._read = read
        self._rest = b""
        self._at_start = True
        self._ended = False
        self._error: Exception | None = None
        self.rows = 0

    async def feed(self, data: bytes | bytearray) -> None:
        if self._error is not None:
            return
        # asyncpg hands over bytearrays; Rust reads bytes.
        whole = self._rest + data if self._rest else bytes(data)
        try:
            consumed, rows, ended = self._read(whole, self._at_start)
        except Exception as exc:  # raised again by finish()
            self._error = exc
            return
        self._at_start = self._at_start and consumed == 0
        self._rest = whole[consumed:]
        self.rows += rows
        self._ended = ended

    def finish(self) -> int:
        """The rows read; the reader's error, or ValueError if the stream stopped within a row
        or before its end."""
        if self._error is not None:
            raise self._error
        if not self._ended or self._rest:
            raise ValueError(
                f"assignments: the COPY stream stopped early ({len(self._rest)} bytes unread)"
            )
        return self.rows


def assignment_from_row(row: AssignmentRow, experiment_key: str) -> Assignment:
    return Assignment(
        id=row.id,
        experiment_key=experiment_key,
        handle=row.experiment_id,
        user_id=row.user_id,
        variant=row.variant,
        segment_key=row.segment_key,
        cascade_level=row.cascade_level,
        propensity=row.propensity if row.propensity is not None else 0.0,
        created_ms=_ms(row.created_at),
    )


def _row(a: Assignment) -> AssignmentRow:
    return AssignmentRow(
        id=a.id,
        experiment_id=a.handle,
        user_id=a.user_id,
        variant=a.variant,
        segment_key=a.segment_key,
        segment_hash=key_hash(a.segment_key),
        cascade_level=a.cascade_level,
        propensity=a.propensity,
        created_at=datetime_of_ms(a.created_ms),
    )


@dataclass
class _Unit:
    """What one flush writes, kept as is (same token) until it is written: a retry of a
    flush whose commit went unacknowledged then changes nothing."""

    token: str
    batch: list[Assignment]
    made: list[MadeAssignments]
    counts: list[CountRow]
    segments: list[SegmentRow]
    since: float  # when its oldest assignment was buffered (monotonic)

    def rows(self) -> int:
        return len(self.batch) + sum(map(len, self.made))

    def of_user(self, user_id: str) -> list[Assignment]:
        mine = [a for a in self.batch if a.user_id == user_id]
        return mine + [Assignment._make(h) for m in self.made for h in m.of_user(user_id)]

    def without_user(self, user_id: str) -> _Unit:
        return replace(
            self,
            batch=[a for a in self.batch if a.user_id != user_id],
            made=[m.without_user(user_id) for m in self.made],
        )

    def write(self, block: bool = False, block_rows: int = BLOCK_MAX_ROWS) -> WriteBehind:
        """The flush's writes; with `block`, its assignments as compressed blocks of about
        `block_rows` each (a batch's are not split; see `assignment_parts`)."""
        visitors = Counter(a.handle for a in self.batch)
        for m in self.made:
            for (handle, _), n in m.level_counts():
                visitors[handle] += n
        blocks = [
            AssignmentBlock(n, *assignment_block(made, singles))
            for made, singles, n in (
                assignment_parts(self.batch, self.made, block_rows) if block else []
            )
        ]
        return WriteBehind(
            token=self.token,
            # One binary COPY stream written in Rust: asyncpg's array encoding checked every
            # element of the single assignments' columns (an ABC isinstance each).
            copy_rows=(
                copy_assignments(self.made, self.batch) if self.rows() and not block else b""
            ),
            blocks=blocks,
            segments=self.segments,
            visitors=visitors,
            counts=self.counts,
        )


@dataclass
class _Waiting:
    rows: list[ConversionRow]
    done: asyncio.Future[list[bool]]


@dataclass
class FlushStats:
    """What the write-behind has done; read by tests, benchmarks and metrics."""

    flushes: int = 0
    assignments_written: int = 0
    allocation_rows_written: int = 0
    conversion_batches: int = 0
    conversions_written: int = 0
    failures: int = 0
    last_flush_lag_ms: float = 0.0
    pending_assignments: int = 0
    # Allocations and conversions refused because the buffers were full (RESOURCE_EXHAUSTED).
    refused: int = 0
    # Buffered assignments that could not be written before the journal closed (lost).
    dropped: int = 0
    # Blocks written, and assignments expanded from blocks into their table by this process;
    # assignments in blocks (all processes', as last read).
    blocks_written: int = 0
    assignments_expanded: int = 0
    unexpanded_assignments: int = 0
    lags_ms: list[float] = field(default_factory=list)


class PostgresJournal:
    """Journal over PostgreSQL. `start()` runs the flusher; `close()` flushes everything."""

    def __init__(
        self,
        store: PostgresStore,
        take_deltas: Callable[[], list[CountRow]] | None = None,
        *,
        flush_interval: float = 0.1,
        commit_window: float = 0.002,
        max_group: int = 2000,
        experiment_interval: float = 1.0,
        analytics_interval: float = 60.0,
        max_pending_assignments: int = 200_000,
        max_pending_conversions: int = 50_000,
        block_min_rows: int = 10_000,
        max_unexpanded_assignments: int = 10_000_000,
        block_max_rows: int = BLOCK_MAX_ROWS,
        block_quiet_s: float = BLOCK_QUIET_S,
    ) -> None:
        # A flush of at least `block_min_rows` assignments writes them as blocks of about
        # `block_max_rows` while blocks hold fewer than `max_unexpanded_assignments` (0: never).
        # Blocks are expanded once none was written for `block_quiet_s`, and never sooner than
        # two flush intervals (blocks under load come one an interval).
        self._block_min_rows = max(1, block_min_rows)
        self._block_quiet_s = max(block_quiet_s, 2 * flush_interval)
        self._block_max_rows = max(1, block_max_rows)
        self._max_unexpanded = max_unexpanded_assignments
        self._last_flush_block = False
        # Whether the last large flush found the blocks at `max_unexpanded_assignments`.
        self._at_bound = False
        self._max_pending_assignments = max_pending_assignments
        self._max_pending_conversions = max_pending_conversions
        self._waiting_rows = 0
        self._experiment_interval = experiment_interval
        self._analytics_interval = analytics_interval
        self._known_segments: set[tuple[int, int]] = set()
        self._store = store
        self._take_deltas = take_deltas
        self._flush_interval = flush_interval
        self._commit_window = commit_window
        self._max_group = max_group
        # Assignments not written yet (single ones, and batches' as columns in Rust), and when
        # the oldest of them was buffered (monotonic).
        self._assignments: list[Assignment] = []
        self._made: list[MadeAssignments] = []
        self._made_rows = 0
        # Where unary allocations' assignments wait, appended by Rust (`attach_log`); their
        # wait is timed from their own creation, not `_pending_since`.
        self._logs: list[AssignmentLog] = []
        self._pending_since = 0.0
        # A flush that failed, retried as it is before anything newer is written.
        self._unwritten: _Unit | None = None
        self._waiting: list[_Waiting] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._flush_lock = asyncio.Lock()
        # Lookups of assignments memory does not hold, taken together while others run.
        self._latest_rounds: Rounds[int, str, AssignmentRow] = Rounds(store.get_latest_assignments)
        self._id_rounds: Rounds[None, str, AssignmentRow] = Rounds(
            lambda _, ids: store.get_assignments_by_ids(ids)
        )
        # False after a failed write, True after a successful one.
        self.healthy = True
        self.stats = FlushStats()

    @property
    def lookup_rounds(self) -> int:
        """Rounds of lookups in PostgreSQL so far (each one store call per experiment, or for
        ids, however many callers it answered)."""
        return self._latest_rounds.rounds + self._id_rounds.rounds

    def bind_deltas(self, take_deltas: Callable[[], list[CountRow]]) -> None:
        self._take_deltas = take_deltas

    def start(self, on_experiments: Callable[[list[Experiment]], None] | None = None) -> None:
        """Run the flusher and the group commit; with `on_experiments`, also hand over the
        experiments every `experiment_interval` (other replicas create and change them)."""
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="write-behind"),
            asyncio.create_task(self._commit_loop(), name="group-commit"),
            asyncio.create_task(self._analytics_loop(), name="analytics"),
        ]
        if self._max_unexpanded:
            self._tasks.append(asyncio.create_task(self._expand_loop(), name="expand-blocks"))
        if on_experiments is not None:
            self._tasks.append(
                asyncio.create_task(self._experiment_loop(on_experiments), name="experiments")
            )

    async def _experiment_loop(self, on_experiments: Callable[[list[Experiment]], None]) -> None:
        # Read every experiment only when one was created, changed or deleted: at 1,000 of them
        # a read took 46 ms of the event loop, every second (bench/RESULTS.md item 70); the
        # fingerprint takes one row. A change the fingerprint shows is what `load_experiments`
        # acts on anyway (a newer `updated_at`).
        seen: tuple[int, int] | None = None
        while True:
            await asyncio.sleep(self._experiment_interval)
            try:
                now = await self._store.experiments_fingerprint()
                if now != seen:
                    on_experiments(await self.experiments())
                    seen = now
            except STORE_DOWN as exc:
                log.warning("experiment refresh failed", extra={"error": repr(exc)})
            except Exception:
                # Keep polling: a dead loop would stop replicas seeing experiment changes, and
                # its exception would surface only at close(), failing the shutdown.
                log.exception("experiment refresh failed")

    async def close(self) -> None:
        """Stop the loops, then write what is buffered (conversions first)."""
        self._closing = True
        self._wake.set()
        await stop_tasks(self._tasks)
        await self._commit_pending()
        await self.flush()
        lost = self._pending()
        if lost:
            self.stats.dropped += lost
            log.error("assignments not written at close", extra={"lost": lost})

    # Experiments: written through.

    async def save_experiment(self, experiment: Experiment, *, new: bool) -> Experiment:
        try:
            row = experiment_row(experiment)
            saved = (
                await self._store.insert_experiment(row)
                if new
                else await self._store.update_experiment(row)
            )
        except ConflictError:
            raise AlreadyExists(f"experiment {experiment.key!r} already exists") from None
        except STORE_DOWN as exc:
            raise Unavailable(f"experiment store unavailable: {type(exc).__name__}") from None
        return experiment_from_row(saved)

    async def experiments(self) -> list[Experiment]:
        return [experiment_from_row(r) for r in await self._store.list_experiments()]

    # Assignments evicted from memory: read back. The memory holds at least twice the
    # write-behind bound, so an evicted assignment has left the buffer (server.build_service).

    async def stored_latest(
        self, experiment: Experiment, user_ids: Sequence[str]
    ) -> dict[str, Assignment]:
        try:
            rows = await self._latest_rounds.find(experiment.handle, user_ids)
        except STORE_DOWN as exc:
            raise Unavailable(f"assignment store unavailable: {type(exc).__name__}") from None
        return {user: assignment_from_row(row, experiment.key) for user, row in rows.items()}

    async def stored_assignment(
        self, assignment_id: str, experiments: Mapping[int, Experiment]
    ) -> Assignment | None:
        try:
            row = (await self._id_rounds.find(None, [assignment_id])).get(assignment_id)
        except STORE_DOWN as exc:
            raise Unavailable(f"assignment store unavailable: {type(exc).__name__}") from None
        experiment = None if row is None else experiments.get(row.experiment_id)
        if row is None or experiment is None:
            return None
        return assignment_from_row(row, experiment.key)

    async def load(self) -> tuple[list[Experiment], list[CountRow], list[tuple[int, str]]]:
        """What the service needs at start but the assignments: experiments, counters and the
        known segments (the assignments: `hold_newest`)."""
        experiments = await self.experiments()
        counts = await self._store.load_counts()
        segments: list[tuple[int, str]] = []
        for e in experiments:
            for seg in await self._store.list_segments(e.handle):
                self._known_segments.add((e.handle, seg.segment_hash))
                segments.append((e.handle, seg.segment_key))
        return experiments, counts, segments

    async def hold_newest(
        self, experiments: Iterable[Experiment], hold: int, into: Restoring
    ) -> Restored:
        """Hold again at start each experiment's stored assignments, oldest first: all of them
        (`hold` 0), or its newest `hold` + 1. One more than memory keeps: an experiment with
        more rows in PostgreSQL evicts one as they are held. Then the rows of the blocks not
        expanded yet, read out of them (`Restoring.hold_block`), not expanded first: a restart
        under batch load does not wait for PostgreSQL to take millions of rows. The table and
        the blocks are read as of one moment (`PostgresStore.snapshot`)."""
        restored = Restored()
        async with self._store.snapshot() as connection:
            for e in experiments:
                stream = CopyPieces(functools.partial(into.hold_copied, e.handle))
                newest = hold + 1 if hold else None
                await self._store.copy_out_assignments(
                    e.handle, stream.feed, newest=newest, connection=connection
                )
                rows = stream.finish()
                restored.held += rows
                if newest is not None and rows == newest:
                    restored.unread.append(e.handle)
            # Their users are listed later (`list_users`); until then each user of theirs not
            # held is looked up. Before the blocks: a block's row may be older than one not read.
            into.unlisted(restored.unread)
            restored.blocks, restored.block_rows, block_held = await self._store.read_blocks(
                connection, into.hold_block
            )
            restored.held += block_held
        return restored

    async def list_users(
        self,
        handle: int,
        list_copied: Callable[[bytes, bool], tuple[int, int, bool]],
        *,
        connection: Any = None,
    ) -> int:
        """Give the users of experiment `handle`'s stored assignments to `list_copied(data,
        at_start)` (`HeldAssignments.list_copied`) as pieces of a binary COPY stream; how many
        rows were read. Rows still in blocks are not read: a restart read every block's
        (`hold_newest`), and this process's own are held or were evicted (and known so); a
        renewal reads them in the same snapshot (`list_stored`). On `connection` (a
        `snapshot`'s), or one of the pool's."""
        stream = CopyPieces(list_copied)
        try:
            await self._store.copy_out_users(handle, stream.feed, connection=connection)
        except STORE_DOWN as exc:
            raise Unavailable(f"assignment store unavailable: {type(exc).__name__}") from None
        return stream.finish()

    async def list_stored(
        self,
        handles: Sequence[int],
        list_block: Callable[[bytes], int],
        list_copied: Callable[[int, bytes, bool], tuple[int, int, bool]],
    ) -> int:
        """In one snapshot of the store, give every assignment block's payload to
        `list_block` (`HeldAssignments.list_block`, on a worker thread: a block of 20,000
        rows takes it about 2 ms, which calls would otherwise wait) and the users of each of
        `handles`' stored rows to `list_copied(handle, data, at_start)` as pieces of a binary
        COPY stream: a row is read in its block or, expanded meanwhile, in the table, never
        neither. How many rows were read."""
        rows = 0
        try:
            async with self._store.snapshot() as connection:
                async for payload, _ in self._store.stored_blocks(connection):
                    rows += await asyncio.to_thread(list_block, payload)
                for handle in handles:
                    listing = functools.partial(list_copied, handle)
                    rows += await self.list_users(handle, listing, connection=connection)
        except STORE_DOWN as exc:
            raise Unavailable(f"assignment store unavailable: {type(exc).__name__}") from None
        return rows

    # Traffic, recommendations, audit: written through.

    async def traffic(self, handle: int) -> list[DailyTraffic]:
        rows = await self._store.get_traffic(handle)
        return [DailyTraffic(r.day, r.visitors, r.allocations, r.conversions) for r in rows]

    async def save_recommendation(
        self, handle: int, kind: str, payload: Mapping[str, Any]
    ) -> StoredRecommendation | None:
        row = await self._store.insert_recommendation(handle, kind, payload)
        return None if row is None else _stored(row)

    async def recommendations(
        self, handle: int | None, status: str | None
    ) -> list[StoredRecommendation]:
        return [_stored(r) for r in await self._store.list_recommendations(handle, status)]

    async def get_recommendation(self, recommendation_id: str) -> StoredRecommendation | None:
        if not recommendation_id.isdigit() or len(recommendation_id) > 18:
            return None
        row = await self._store.get_recommendation(int(recommendation_id))
        return None if row is None else _stored(row)

    async def decide_recommendation(
        self, recommendation_id: str, status: str, actor: str
    ) -> StoredRecommendation | None:
        if not recommendation_id.isdigit() or len(recommendation_id) > 18:
            return None
        row = await self._store.decide_recommendation(int(recommendation_id), status, actor)
        return None if row is None else _stored(row)

    async def audit(self, actor: str, action: str, target: str, details: Mapping[str, Any]) -> None:
        await self._store.write_audit(actor, action, target, details)

    async def save_tree(self, handle: int, nodes: Sequence[TreeNodeRecord]) -> None:
        await self._store.save_hierarchy(
            handle,
            [
                HierarchyRow(
                    node_hash=n.segment_hash,
                    parent_hash=n.parent_hash,
                    level=n.level,
                    segment_key=n.segment_key,
                    allocations=n.allocations,
                    conversions=n.conversions,
                    value_sum=n.value_sum,
                    stats=dict(n.stats),
                    pruned=n.pruned,
                )
                for n in nodes
            ],
        )

    async def without_user(
        self, user_id: str, erase: Callable[[], Awaitable[_T]]
    ) -> tuple[list[AssignmentRow], _T]:
        """Drop the user's buffered assignments and run `erase` while no flush runs, so a
        flush cannot write them back after the erasure; return the dropped rows too."""
        async with self._flush_lock:
            dropped = self.pending_assignments_of(user_id)
            self._assignments = [a for a in self._assignments if a.user_id != user_id]
            self._made = [m.without_user(user_id) for m in self._made]
            self._made_rows = sum(map(len, self._made))
            for assignments in self._logs:
                assignments.forget_user(user_id)
            if self._unwritten is not None:
                self._unwritten = self._unwritten.without_user(user_id)
            self._share_room()
            return dropped, await erase()

    def pending_assignments_of(self, user_id: str) -> list[AssignmentRow]:
        """The user's assignments not yet written (data-protection export)."""
        mine = [] if self._unwritten is None else self._unwritten.of_user(user_id)
        mine += [a for a in self._assignments if a.user_id == user_id]
        mine += [Assignment._make(h) for m in self._made for h in m.of_user(user_id)]
        mine += [Assignment._make(h) for g in self._logs for h in g.of_user(user_id)]
        return [_row(a) for a in mine]

    # Allocations: written behind.

    def _pending(self) -> int:
        """Assignments buffered (the unwritten unit's and the logs' too)."""
        return self._buffered() + sum(map(len, self._logs))

    def _buffered(self) -> int:
        """Assignments passed to this journal and not written (the unwritten unit's too)."""
        unwritten = 0 if self._unwritten is None else self._unwritten.rows()
        return len(self._assignments) + self._made_rows + unwritten

    def has_room(self, n: int) -> bool:
        return self._pending() + n <= self._max_pending_assignments

    def _share_room(self) -> None:
        """Tell each log how many assignments it may hold, so that Rust checks the bound for
        the unary calls it answers: the bound less everything else pending. Called wherever
        that changes but for the logs themselves (other logs are counted as they are now: a
        server has one)."""
        rest = self._buffered()
        logged = [len(log) for log in self._logs]
        total = sum(logged)
        for log, n in zip(self._logs, logged, strict=True):
            log.set_room(self._max_pending_assignments - rest - (total - n))

    def admit(self, n: int) -> None:
        if not self.has_room(n):
            self.stats.refused += n
            raise ResourceExhausted(
                f"write-behind buffer full ({self._pending()} assignments pending)"
            )

    def assignment_made(self, assignment: Assignment) -> None:
        # Kept as is: the rows are built when they are written, off the allocation's path.
        if not self._buffered():
            self._pending_since = time.monotonic()
        self._assignments.append(assignment)
        self._share_room()

    def assignments_made(self, made: MadeAssignments) -> None:
        if not self._buffered():
            self._pending_since = time.monotonic()
        self._made.append(made)
        self._made_rows += len(made)
        self._share_room()

    def attach_log(self, log: AssignmentLog) -> bool:
        self._logs.append(log)
        self._share_room()
        return True

    def _take_logged(self) -> tuple[list[MadeAssignments], float | None]:
        """What the logs hold (they start empty again), and when (monotonic) the oldest of it
        was made; None when they held nothing."""
        made: list[MadeAssignments] = []
        oldest: int | None = None
        for assignments in self._logs:
            made_ms = assignments.oldest_ms
            if made_ms is not None:
                oldest = made_ms if oldest is None else min(oldest, made_ms)
                made.append(assignments.take())
        if oldest is None:
            return made, None
        return made, time.monotonic() - max(0.0, time.time() * 1000 - oldest) / 1000

    async def _flush_loop(self) -> None:
        took = 0.0
        while True:
            # A flush starts every interval, at once after one that took longer: under batch
            # load a flush takes a good part of it, and the buffer grows while it waits.
            await asyncio.sleep(max(0.0, self._flush_interval - took))
            began = time.monotonic()
            # Shielded: cancelled half way (by close), a flush would drop the batch it took.
            await asyncio.shield(self.flush())
            took = time.monotonic() - began

    async def _analytics_loop(self) -> None:
        """Refresh the analytics view, on a task of its own: at millions of counters a refresh
        takes minutes (bench/RESULTS.md item 69), and flushes must not wait for it, as they did
        when the flush loop ran it. The next refresh is due an interval after the last one
        ended, and no sooner than `_REFRESH_SPACING` times as long as it took after that: however
        large the view grows, refreshing it takes at most a sixth of a PostgreSQL core."""
        wait = self._analytics_interval
        while True:
            await asyncio.sleep(wait)
            began = time.monotonic()
            await self.refresh_analytics()
            wait = max(self._analytics_interval, _REFRESH_SPACING * (time.monotonic() - began))

    async def _expand_loop(self) -> None:
        """Expand blocks into `assignments`, one after another, while the last flush was small
        enough to write rows and no process wrote a block for `block_quiet_s`: a flush of
        blocks means the load is past what rows take, and expanding would slow the flushes (a
        replica with no load of its own would take PostgreSQL and the cores from the one
        under load). Blocks of other processes are looked for every few seconds when this
        process knows of none."""
        idle = _BLOCK_LOOK_TICKS
        expanded = 0
        tick = min(self._flush_interval, _EXPAND_TICK_S)
        while True:
            # At once again after a block: blocks are small (BLOCK_MAX_ROWS), the backlog not.
            await asyncio.sleep(0 if expanded else tick)
            expanded = 0
            if self._last_flush_block:
                continue
            if not self.stats.unexpanded_assignments and idle < _BLOCK_LOOK_TICKS:
                idle += 1
                continue
            idle = 0
            try:
                unexpanded, newest_age_s = await self._store.block_backlog()
                self.stats.unexpanded_assignments = unexpanded
                if newest_age_s is not None and newest_age_s < self._block_quiet_s:
                    continue
                if unexpanded:
                    expanded = await self._store.expand_blocks(limit=1)
                    self.stats.assignments_expanded += expanded
                    self.stats.unexpanded_assignments -= min(
                        expanded, self.stats.unexpanded_assignments
                    )
            except Exception as exc:
                log.warning("expanding assignment blocks failed", extra={"error": repr(exc)})
                await asyncio.sleep(_BLOCK_RETRY_S)

    def _new_segments(self, paths: Iterable[tuple[int, str]]) -> list[SegmentRow]:
        """Segments (every level of each (experiment, key) path) not registered yet by this
        process."""
        out: list[SegmentRow] = []
        for experiment_id, segment_key in dict.fromkeys(paths):
            parent: int | None = None
            for level, key in enumerate(parent_keys(segment_key)):
                h = key_hash(key)
                if (experiment_id, h) not in self._known_segments:
                    self._known_segments.add((experiment_id, h))
                    dims = dict(part.split(":", 1) for part in key.split("|")) if key else {}
                    out.append(SegmentRow(experiment_id, h, key, level, parent, dims))
                parent = h
        return out

    async def refresh_analytics(self) -> None:
        """Refresh the analytics view unless another process is refreshing it or did less
        than half an interval ago (every worker and replica runs this loop)."""
        try:
            await self._store.refresh_analytics(older_than_s=self._analytics_interval / 2)
        except Exception as exc:
            log.warning("analytics refresh failed", extra={"error": repr(exc)})

    async def flush(self) -> None:
        """Write buffered assignments and allocation deltas; keep them on failure."""
        # One at a time, so that close() waits for a flush the loop had started.
        async with self._flush_lock:
            try:
                await self._flush()
            finally:
                self._share_room()

    async def flushed(self) -> bool:
        """`flush`: whether everything buffered before the call is written."""
        await self.flush()
        return self._unwritten is None

    async def _flush(self) -> None:
        if self._unwritten is not None:
            if not await self._write(self._unwritten):
                return
            self._unwritten = None
        unit = self._take()
        if unit is None:
            self._last_flush_block = False
        elif not await self._write(unit):
            self._unwritten = unit

    def _take(self) -> _Unit | None:
        """Everything buffered, as the next flush's unit (None: nothing)."""
        since = self._pending_since if self._assignments or self._made else None
        batch, self._assignments = self._assignments, []
        made, self._made, self._made_rows = self._made, [], 0
        logged, logged_since = self._take_logged()
        made += logged
        if logged_since is not None:
            since = logged_since if since is None else min(since, logged_since)
        counts = []
        if self._take_deltas is not None:
            counts = [(e, s, v, a, 0, 0.0) for e, s, v, a, _, _ in self._take_deltas() if a]
        if not batch and not made and not counts:
            return None
        segments = self._new_segments(
            itertools.chain(
                ((a.handle, a.segment_key) for a in batch),
                *(m.distinct_keys() for m in made),
            )
        )
        return _Unit(
            secrets.token_hex(12),
            batch,
            made,
            counts,
            segments,
            self._pending_since if since is None else since,
        )

    def _as_block(self, rows: int) -> bool:
        """Whether a flush of `rows` assignments writes them as blocks. A large flush the bound
        turns into rows is logged once, until blocks are written again."""
        if rows < self._block_min_rows or not self._max_unexpanded:
            return False
        unexpanded = self.stats.unexpanded_assignments + rows
        at_bound = unexpanded > self._max_unexpanded
        if at_bound and not self._at_bound:
            log.warning(
                "assignment blocks at max_unexpanded_assignments: large flushes write rows"
                " (slower; allocations are refused once they fall behind) until blocks are"
                " expanded",
                extra={"unexpanded": self.stats.unexpanded_assignments, "flush": rows},
            )
        elif self._at_bound and not at_bound:
            log.info("large flushes write blocks again", extra={"unexpanded": unexpanded - rows})
        self._at_bound = at_bound
        return not at_bound

    async def _write(self, unit: _Unit) -> bool:
        """Write a unit in one transaction; False (kept for a retry) when that fails."""
        block = self._as_block(unit.rows())
        try:
            # Off the event loop: Rust writes the rows of a batch without the GIL.
            flush = await asyncio.to_thread(unit.write, block, self._block_max_rows)
            await self._store.write_behind(flush)
        except Exception as exc:
            self.stats.failures += 1
            self.healthy = False
            log.warning("write-behind flush failed, will retry", extra={"error": repr(exc)})
            return False
        self.healthy = True
        written = unit.rows()
        self._last_flush_block = block
        if block:
            self.stats.blocks_written += len(flush.blocks)
            self.stats.unexpanded_assignments += written
        self.stats.flushes += 1
        self.stats.assignments_written += written
        self.stats.allocation_rows_written += len(unit.counts)
        if written:
            lag = (time.monotonic() - unit.since) * 1000
            self.stats.last_flush_lag_ms = lag
            self.stats.lags_ms.append(lag)
            del self.stats.lags_ms[:-1000]
        self.stats.pending_assignments = self._pending()
        return True

    # Conversions: group commit.

    async def record_conversions(self, conversions: Sequence[Conversion]) -> list[bool]:
        if self._closing:
            raise Unavailable("server is shutting down")
        if self._waiting_rows + len(conversions) > self._max_pending_conversions:
            self.stats.refused += len(conversions)
            raise ResourceExhausted(
                f"conversion queue full ({self._waiting_rows} conversions waiting to commit)"
            )
        rows = [
            ConversionRow(
                assignment_id=c.assignment_id,
                experiment_id=c.handle,
                variant=c.variant,
                path_hashes=[key_hash(k) for k in parent_keys(c.segment_key)],
                value=c.value,
                idempotency_key=c.idempotency_key,
                segment_key=c.segment_key,
                user_id=c.user_id,
            )
            for c in conversions
        ]
        done: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(rows, done))
        self._waiting_rows += len(rows)
        self._wake.set()
        return await done

    async def _commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let concurrent callers join this transaction.
            await asyncio.sleep(self._commit_window)
            await self._commit_pending()

    async def _commit_pending(self) -> None:
        while self._waiting:
            group: list[_Waiting] = []
            size = 0
            while self._waiting and (
                not group or size + len(self._waiting[0].rows) <= self._max_group
            ):
                w = self._waiting.pop(0)
                self._waiting_rows -= len(w.rows)
                group.append(w)
                size += len(w.rows)
            rows = [r for w in group for r in w.rows]
            try:
                counted = await self._store.insert_conversions(rows)
            except Exception as exc:
                # Not committed, so not acknowledged: the caller retries with its idempotency
                # key, which makes the retry safe whatever happened here.
                if not isinstance(exc, STORE_DOWN):
                    log.exception("conversion commit failed")
                failure = Unavailable(f"conversion store unavailable: {type(exc).__name__}")
                for w in group:
                    if not w.done.done():
                        w.done.set_exception(failure)
                continue
            self.stats.conversion_batches += 1
            self.stats.conversions_written += sum(counted)
            start = 0
            for w in group:
                if not w.done.done():
                    w.done.set_result(counted[start : start + len(w.rows)])
                start += len(w.rows)


def _stored(row: RecommendationRow) -> StoredRecommendation:
    return StoredRecommendation.from_payload(
        str(row.id), row.experiment_id, row.kind, row.payload, row.status, _ms(row.created_at)
    )
