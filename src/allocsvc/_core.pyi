"""Typed stub of the Rust extension built from rust_core/py.

Internal: import it only through `allocsvc.core`, which re-exports it.
Segment hashes are unsigned 64-bit integers (xxh3-64 of the canonical key's UTF-8 bytes, seed 0).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import final

__version__: str

# What `BatchCatalogue.allocate_one` answers (see there); the tuples leave its caller work.
UnaryFollowUp = (
    tuple[bytes, tuple[int, str] | None, bool, Features | None]
    | tuple[bytes, tuple[int, int, str, int, str, int, float]]
)
UnaryOutcome = bytes | str | UnaryFollowUp | None
__all__ = [
    "ASSIGNMENT_COPY_COLUMNS",
    "RESTORE_COPY_COLUMNS",
    "AssignmentLog",
    "BatchCatalogue",
    "Engine",
    "HeldAssignments",
    "MadeAssignments",
    "PreparedBatch",
    "UnaryLane",
    "UnaryPath",
    "__version__",
    "assignment_block",
    "batch_items",
    "beta_throughput",
    "block_rows_of_ids",
    "block_rows_of_users",
    "bucket",
    "copy_assignments",
    "decompress_block",
    "filter_may_hold_id",
    "filter_may_hold_user",
    "filters_may_hold_ids",
    "filters_may_hold_users",
    "framed",
    "key_hash",
    "parent_keys",
    "path_keys",
    "sample_beta",
    "seed_rng",
    "segment_key",
    "selection_probabilities",
    "shared_records",
    "sticky_claims",
    "thompson_select",
]

# (experiment, segment hash, variant, allocations, conversions, value sum)
CountRow = tuple[int, int, int, int, int, float]
# (variant index, cascade level used, propensity, full canonical segment key)
Decision = tuple[int, int, float, str]
# An allocation made outside the batch: (assignment id, variant index, segment key,
# cascade level, propensity, sticky)
GivenAllocation = tuple[str, int, str, int, float, bool]
# An item's failure: (gRPC status code number, message, request field or "")
ItemError = tuple[int, str, str]
# (user id, channel, device, source, hour, day of week, pages_viewed, time_seconds,
# engagement_score, drop_risk): an item as learning keeps it (`PreparedBatch.features`).
Features = tuple[
    str, str, str, str, int, int, float | None, float | None, float | None, float | None
]
# An assignment held: (id, experiment key, handle, user id, variant, segment key, cascade level,
# propensity, created ms).
HeldTuple = tuple[str, str, int, str, int, str, int, float, int]

def batch_items(request: bytes, positions: Sequence[int]) -> list[bytes]:
    """The serialized items at `positions` of a serialized AllocateBatchRequest (the others
    are not decoded; positions past the end are skipped). ValueError when malformed."""

# The `assignments` columns of `copy_assignments`' rows, in order.
ASSIGNMENT_COPY_COLUMNS: list[str]
# The columns HeldAssignments.add_copied reads, in order.
RESTORE_COPY_COLUMNS: list[str]

def copy_assignments(
    made: Sequence[MadeAssignments],
    singles: Sequence[HeldTuple] | None = None,
    *,
    compressed: bool = False,
) -> bytes:
    """Assignments as one PostgreSQL binary COPY stream (header, rows, trailer): `singles`
    first, then those of `made`, in order; with `compressed`, that stream as an LZ4 block with
    its length in front (`decompress_block`). The rows of `made` and the compression are
    written without the GIL."""

def decompress_block(data: bytes) -> bytes:
    """The COPY stream of a stored block's payload, read without the GIL: of an
    `assignment_block` block (compact) its rows as `copy_assignments` writes them; of a
    `copy_assignments(..., compressed=True)` block (as blocks were stored before 2026-11-26)
    that stream. ValueError when `data` is neither."""

# A row of an assignment block: (id, handle, user id, variant, segment key, segment hash,
# cascade level, propensity, created ms or None in blocks stored before rows carried it).
BlockRow = tuple[str, int, str, int, str, int, int, float, int | None]

def block_rows_of_users(data: bytes, handle: int, user_ids: list[str]) -> list[BlockRow]:
    """The rows in experiment `handle` of `user_ids` in a stored block (see
    `decompress_block`), in its order, read without expanding it (decompressed and read
    without the GIL). ValueError when `data` is not such a block."""

def block_rows_of_ids(data: bytes, ids: Sequence[str]) -> list[BlockRow]:
    """The rows with one of the assignment ids `ids` in a compressed block, in the block's
    order (see `block_rows_of_users`)."""

def assignment_block(
    made: Sequence[MadeAssignments], singles: Sequence[HeldTuple] | None = None
) -> tuple[bytes, bytes]:
    """A block of these assignments as stored: its payload, the assignments' columns in the
    compact form of `allocsvc_core::compact` (LZ4; `decompress_block` gives the COPY stream
    `copy_assignments(made, singles)` would), and its Bloom filter; those of `made` without
    the GIL. The filter holds their (experiment, user) pairs and ids (xxh3, stable across
    processes): it never misses an assignment put in; about 0.1% of others pass."""

def shared_records(
    made: Sequence[MadeAssignments], key_prefix: str, singles: Sequence[HeldTuple] | None = None
) -> bytes:
    """These assignments' records for shared state (`singles` first, then those of `made`):
    each its key (`key_prefix` + id) and its value, the JSON array `json.dumps` writes of its
    tuple, each preceded by its length (4 bytes, big-endian); those of `made` without the
    GIL."""

def framed(texts: Sequence[str]) -> bytes:
    """`texts` in UTF-8, each preceded by its length (4 bytes, big-endian), as `shared_records`
    frames its keys and values."""

def sticky_claims(made: MadeAssignments, sticky_keys: Mapping[int, str]) -> tuple[bytes, list[int]]:
    """The sticky claims of `made`'s assignments of the experiments `sticky_keys` names
    (handle -> key of its hash of sticky assignments): each that key, the user id and the
    assignment's record value (as `shared_records` writes it), each preceded by its length (4
    bytes, big-endian), written without the GIL; and the positions in `made` of the claimed
    assignments, in order."""

def filter_may_hold_user(filter: bytes, handle: int, user_id: str) -> bool:
    """Whether a block's `filter` may hold an assignment of (`handle`, `user_id`); an empty
    filter (a block stored without one) may hold anything."""

def filter_may_hold_id(filter: bytes, id: str) -> bool:
    """Whether a block's `filter` may hold assignment `id`; an empty filter may hold
    anything."""

def filters_may_hold_users(
    filters: Sequence[bytes], handle: int, user_ids: Sequence[str]
) -> list[int]:
    """Positions in `filters` of the blocks' filters that may hold an assignment of `handle`
    and one of `user_ids` (an empty filter may hold anything)."""

def filters_may_hold_ids(filters: Sequence[bytes], ids: Sequence[str]) -> list[int]:
    """Positions in `filters` of the blocks' filters that may hold one of the assignments
    `ids` (an empty filter may hold anything)."""

def segment_key(dimensions: Sequence[str], values: Sequence[str]) -> str:
    """Canonical key `dim:value|dim:value` (values trimmed, lower-cased, `%|:` escaped)."""

def path_keys(dimensions: Sequence[str], values: Sequence[str]) -> list[str]:
    """Keys of the cascade path: global (empty key), then one key per level."""

def key_hash(key: str) -> int:
    """Stable 64-bit hash of a canonical segment key."""

def parent_keys(key: str) -> list[str]:
    """The cascade path of a canonical key: `""`, first level, ..., the key itself."""

def bucket(user_id: str, seed: int) -> float:
    """Deterministic position of a user in [0, 1) for plain hash splits."""

def seed_rng(seed: int) -> None:
    """Reseed the calling thread's random generator (reproducible runs)."""

def sample_beta(alpha: float, beta: float, n: int) -> list[float]:
    """n draws from Beta(alpha, beta) with the calling thread's generator."""

def beta_throughput(alpha: float, beta: float, n: int) -> float:
    """Draw n Beta samples inside Rust and return their mean (for throughput benchmarks)."""

def thompson_select(
    alphas: Sequence[float], betas: Sequence[float], bonus: Sequence[float] | None = None
) -> int:
    """Index of the largest Beta draw plus bonus."""

def selection_probabilities(
    alphas: Sequence[float], betas: Sequence[float], bonus: Sequence[float] | None = None
) -> list[float]:
    """Monte Carlo probability that Thompson selection picks each variant."""

@final
class Engine:
    """Posterior store, experiment table and segment trees; all methods are thread-safe."""

    def __init__(self) -> None: ...
    def configure(
        self,
        experiment: int,
        *,
        variants: int,
        dimensions: Sequence[str],
        min_samples: Sequence[int],
        policy: str = "thompson",
        weights: Sequence[float] | None = None,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        warm_start: float = 10.0,
        exploration: float = 0.0,
        salt: int = 0,
        propensity_floor: float = 0.0,
    ) -> None:
        """Add or replace an experiment's allocation settings (counters are kept).

        `min_samples` has one entry per dimension: the allocations a node at that level needs
        before the cascade uses it. `policy` is `thompson`, `uniform` or `fixed`.
        `propensity_floor` f (0 <= f < 1 / variants) makes Thompson sampling pick variant i
        with probability (1 - variants * f) p_i + f, and log that; 0 is plain Thompson.
        """

    def remove(self, experiment: int) -> None: ...
    def has_experiment(self, experiment: int) -> bool: ...
    def decide(
        self, experiment: int, user_id: str, values: Sequence[str], record: bool = True
    ) -> Decision:
        """One whole allocation: path hashes, cascade, warm start, Thompson choice.

        The choice is drawn with the exact probabilities that a Thompson draw from the node's
        kept posterior state picks each variant; the propensity is that of the chosen one.

        With `record`, the allocation is counted at every level of the path.
        """

    def decide_batch(
        self,
        experiment: int,
        user_ids: Sequence[str],
        values: Sequence[Sequence[str]],
        record: bool = True,
    ) -> list[Decision]:
        """`decide` for many users of one experiment, with the GIL released."""

    def record_allocation(self, experiment: int, segment_key: str, variant: int) -> None: ...
    def record_made(self, made: MadeAssignments) -> None:
        """Count each of `made`'s assignments as `record_allocation` would (those of
        `PreparedBatch.finish(..., record=False)`, once claimed); every variant is checked
        before any is counted."""

    def record_conversion(
        self, experiment: int, segment_key: str, variant: int, value: float = 0.0
    ) -> None:
        """Count a conversion at every level of the key's path."""

    def counts(self, experiment: int, segment_key: str) -> list[tuple[int, int, float]]:
        """(allocations, conversions, value sum) per variant of one node."""

    def take_deltas(self) -> list[CountRow]:
        """Counter changes since the last call (atomically taken and reset)."""

    def snapshot(self, experiment: int | None = None) -> list[CountRow]:
        """Current totals of every node of one experiment (of all with None)."""

    def load_counts(self, rows: Sequence[CountRow], replace: bool = False) -> None:
        """Add rows to the totals, or with `replace` set totals to them (pending deltas kept)."""

    def set_tree(self, experiment: int, nodes: Sequence[int] | None = None) -> None:
        """Swap in the node hashes the cascade may use; None allows every node."""

    def propensities(self, experiment: int, segment_key: str) -> list[float]:
        """Exact selection probability (numerical integration) of each variant at one node in
        its current state: what a decision there logs as its propensity."""

    def node_count(self) -> int: ...

@final
class BatchCatalogue:
    """What AllocateBatch needs to serve items in Rust: experiments by id (with their
    variants' names and payloads) and the device class of user agents seen before."""

    def __new__(
        cls,
        *,
        max_context_entries: int,
        max_signals: int,
        max_key_chars: int,
        max_value_chars: int,
        max_user_agent_chars: int,
        max_referrer_chars: int,
        max_user_id_chars: int,
        device_cache_size: int,
    ) -> BatchCatalogue: ...
    def put(
        self,
        key: str,
        *,
        handle: int,
        running: bool,
        sticky: bool,
        caller_segments: bool,
        dimensions: Sequence[str],
        variants: Sequence[tuple[str, str, str]],
    ) -> None:
        """Add or replace an experiment; `variants` are (id, name, payload JSON) in order.

        With `caller_segments` (segment values the Python side computes) its items make the
        whole batch go the per-item Python way.
        """

    def remove(self, key: str) -> None: ...
    def learn_devices(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Remember (user agent, device class) pairs; a class is mobile/desktop/tablet/unknown.
        One call's agents are kept together: a cache without room for them is emptied first.
        ValueError for a bad class, before anything is remembered."""

    def prepare(self, request: bytes, now_ms: int) -> PreparedBatch:
        """Decode a serialized AllocateBatchRequest and check every item (context extraction
        included), with the GIL released. `now_ms` stands for a timestamp of 0. ValueError when
        the bytes are malformed."""
    def features_one(self, request: bytes, now_ms: int) -> Features | None:
        """What learning keeps (user id, then `RawFeatures`) of a unary request `allocate_one`
        takes, as `PreparedBatch.features` gives a batch item's; None when the caller's path
        answers it or its user agent is not classified yet."""

    def allocate_one(
        self,
        engine: Engine,
        request: bytes,
        held: HeldAssignments,
        lane: UnaryLane,
        log: AssignmentLog | None,
        now_ms: int,
        shared: bool,
        region: str,
    ) -> UnaryOutcome:
        """Unary Allocate on the wire format (a serialized AllocateRequest), checked and
        decided as an item of a batch: None when the caller's path must answer (bad request,
        caller segments, a sticky user `held` does not have under `shared`, whose new
        assignment is claimed there; one `held` may have evicted; a new assignment past
        `log`'s room, which the caller's journal refuses); a user agent to classify
        (with `learn_devices`) before calling again; the response when the caller has nothing
        more to do. A sticky user whose latest assignment `held` has is answered it. A new
        decision is named `{held's id prefix}-{seq:x}`, `seq` taken from `lane`, and counted
        at every level of its path. With a `log` it is held by `held`, logged and counted by
        `lane`; when the caller has something to do the answer is (response, (handle,
        segment key) when the key is new to `lane`, whether `lane`'s growth countdown ended,
        the call's features (as `features_one` gives them) when learning observes it, else
        None: `lane`'s countdown then waits for `observe_in`).
        Without a log: (response, (seq, handle, user id, variant, segment key, level,
        propensity)), for the caller to keep, count and observe."""

@final
class UnaryLane:
    """What a process counts of the unary calls `BatchCatalogue.allocate_one` answers whole,
    so that most need no Python after it: ids of new assignments, their counts per cascade
    level, the segment keys seen, and the countdowns to the next call learning observes and
    to the next growth report."""

    def __new__(cls) -> UnaryLane:
        """Ids from 1; neither countdown running."""

    def take_seqs(self, n: int) -> int:
        """The first of the next `n` ids (the next one, not taken, when `n` is 0)."""

    def observes_next(self) -> bool:
        """Count one call down to the next observed one: True when this is it (the countdown
        then waits for `observe_in`)."""

    def observe_in(self, calls: int | None) -> None:
        """Observe the `calls`-th call from now (None: none)."""

    def grow_in(self, allocations: int | None) -> None:
        """Report growth after `allocations` more new assignments (None: stop counting)."""

    def take_grown(self) -> tuple[int, list[int]]:
        """New assignments counted toward growth since the last call, and their experiments'
        handles."""

    def level_counts(self, handle: int) -> list[tuple[int, int]]:
        """(cascade level, new assignments counted here) of the experiment, by level."""

@final
class UnaryPath:
    """`BatchCatalogue.allocate_one` bound to everything but the request, for a server's unary
    `Allocate` with a log (no shared state): no Python runs between gRPC's handler and the
    answer of the calls it answers whole."""

    def __new__(
        cls,
        catalogue: BatchCatalogue,
        engine: Engine,
        held: HeldAssignments,
        lane: UnaryLane,
        log: AssignmentLog,
        region: str,
        after: Callable[[bytes, int, UnaryOutcome, str], bytes | None],
    ) -> UnaryPath: ...
    def allocate(self, request: bytes) -> bytes | None:
        """`allocate_one` of the request at the clock's time in milliseconds: its response
        when that is all it answers, else what `after(request, now_ms, outcome, region)`
        answers."""

@final
class PreparedBatch:
    """A decoded and checked AllocateBatchRequest."""

    def __len__(self) -> int: ...
    @property
    def needs_caller(self) -> bool:
        """True when an item must go the per-item Python way (then the whole batch does)."""

    def invalid(self) -> list[int]:
        """Positions of items that break a request rule (the caller words their errors)."""

    def unknown_user_agents(self, catalogue: BatchCatalogue) -> list[str]:
        """Distinct user agents to classify and `learn_devices` before `finish`."""

    def sticky_candidates(self) -> tuple[list[int], list[int], list[str]]:
        """(positions, experiment handles, user ids) of the items of sticky experiments."""

    @property
    def has_sticky(self) -> bool:
        """Whether an item is of a sticky experiment (`sticky_candidates` is not empty),
        without building the candidates."""

    def features(self, catalogue: BatchCatalogue, positions: Sequence[int]) -> list[Features]:
        """What learning keeps (`RawFeatures`, after the user id) of the valid items at
        `positions`, in their order; invalid items are skipped. Their user agents must be
        classified (`BatchCatalogue.learn_devices`): ValueError names one that is not."""

    def finish(
        self,
        engine: Engine,
        catalogue: BatchCatalogue,
        held: HeldAssignments,
        *,
        region: str,
        id_prefix: str,
        first_seq: int,
        now_ms: int,
        given: Mapping[int, GivenAllocation],
        errors: Mapping[int, ItemError],
        record: bool = True,
    ) -> tuple[bytes, MadeAssignments, list[int]]:
        """Decide and count every item not in `given` or `errors`, in request order, on the
        calling thread's generator with the GIL released; a user repeated in a sticky
        experiment gets the first answer again. New assignment ids are `{id_prefix}-{seq:x}`,
        seq from `first_seq` on, made at `now_ms`, handed to `held`: its thread holds them,
        and any call on `held` made after this one returns holds them first if it has not.
        With `record` false the new assignments are neither counted nor held (a replica
        sharing state claims those of sticky experiments first, then counts with
        `Engine.record_made` and holds with `HeldAssignments.hand_over` those that stand).
        Returns the serialized response, the new assignments and the position of the item
        each answers."""

@final
class HeldAssignments:
    """The assignments a process holds: the latest of each (experiment, user) for sticky
    answers, every one by id for conversions and by user for data protection. Compact records
    in Rust (about 64 bytes plus the user id each), out of the garbage collector's sight."""

    def __new__(cls, id_prefix: str, capacity: int = 0, evicted_keys: int = 0) -> HeldAssignments:
        """At most `capacity` assignments (0: no bound), the oldest evicted first; own
        assignment ids are `{id_prefix}-{seq:x}` (kept as numbers). The first part of the
        filter of evicted keys holds `evicted_keys` (0: `capacity`, at least 65,536), its five
        parts 31 times that."""

    @property
    def pending(self) -> int:
        """New assignments of batches handed over by `PreparedBatch.finish` and not yet held:
        a thread of the store's holds them; every other method holds them first."""

    @property
    def evictions(self) -> int:
        """Assignments evicted so far (the store was full)."""

    @property
    def evicted_filter_size(self) -> int:
        """Bytes taken by the filter of evicted (experiment, user) keys."""

    @property
    def evicted_filter_full(self) -> bool:
        """Whether that filter is full: it then passes every key (each user not held of an
        experiment that evicted is looked up in the durable store)."""

    @property
    def incomplete(self) -> bool:
        """Whether some stored assignment may not be held: one was evicted, or a restart did
        not read them all (look up in the durable store what is not found here)."""

    def add_block(self, data: bytes, made_ms: int) -> tuple[int, int]:
        """At a restart that leaves assignment blocks unexpanded, take in a compressed block's
        rows (`made_ms`: when rows stored without `created_at` were made), after the table's
        rows (`add_copied`) and `unlisted`: a row is held as its user's latest when made after
        the latest held, or, none held, when no newer one may be stored (none of the user's
        evicted, made after the rows a restart left unread); other rows stay in the store,
        their users' keys in the filter when no latest is held. (rows, rows held). Without
        the GIL."""

    def may_be_stored(self, handles: list[int], user_ids: list[str]) -> list[int]:
        """The positions of the (experiment `handles[i]`, `user_ids[i]`) whose latest
        assignment may be in the durable store and not here: not held, and its key evicted
        (a filter: a user never seen passes about one in a few hundred), or the experiment
        `unlisted`. ValueError if the lists differ in length."""

    def latest_many(self, handles: list[int], user_ids: list[str]) -> dict[int, HeldTuple]:
        """The latest assignments held of (experiment `handles[i]`, `user_ids[i]`), by
        position `i` (users not held left out). ValueError if the lists differ in length."""

    def unlisted(self, handle: int) -> None:
        """Experiment `handle` has stored assignments a restart did not read back: every user
        not held may have one until `listed(handle)`."""

    def list_copied(self, handle: int, data: bytes, at_start: bool) -> tuple[int, int, bool]:
        """Put the stored users of experiment `handle` in `data`, a piece of a binary COPY
        stream of their ids, among those that may have a stored assignment not held (read as
        `add_copied` reads its pieces): (bytes read, users, whether the stream ended)."""

    def listed(self, handle: int) -> None:
        """Every stored user of experiment `handle` is listed (`list_copied`)."""

    def renew_filter(self) -> bool:
        """Once the filter of evicted keys is full (it passes every key), start a new one and
        mark every experiment that evicted unlisted until it is listed again (`list_block`,
        `list_copied`, `listed`, in one snapshot of the store, after every assignment made
        before this call is stored). False (nothing done) unless full, or while a listing is
        under way."""

    def list_block(self, data: bytes) -> int:
        """Put the users of a compressed assignment block's rows, of experiments that evicted,
        among those that may have a stored assignment not held: its rows. Without the GIL."""

    @property
    def unlisted_experiments(self) -> list[int]:
        """The experiments `unlisted` and not yet `listed`, in order of handle."""

    def __len__(self) -> int: ...
    def name(self, handle: int, key: str) -> None:
        """The experiment key that assignments of `handle` carry."""

    def add(self, a: HeldTuple, latest: bool = True) -> None:
        """Hold `a`; with `latest`, also as its (experiment, user)'s latest. An id held
        already is updated."""

    def latest(self, handle: int, user_id: str) -> HeldTuple | None: ...
    def by_id(self, id: str) -> HeldTuple | None: ...
    def has_id(self, id: str) -> bool: ...
    def has_latest(self, handle: int, user_id: str) -> bool: ...
    def hand_over(self, made: MadeAssignments) -> None:
        """Hold `made` (`PreparedBatch.finish(..., record=False)`'s, once claimed) as
        `PreparedBatch.finish` holds its own."""

    def of_user(self, user_id: str) -> list[HeldTuple]:
        """Every assignment of the user, newest first."""

    def forget_user(self, user_id: str) -> list[HeldTuple]:
        """Drop every assignment of the user; returns them, newest first."""

    def user_ids(self) -> list[str]: ...
    def add_copied(
        self, handle: int, data: bytes, at_start: bool
    ) -> tuple[int, int, list[str], bool]:
        """Hold the assignments of experiment `handle` in `data`, a piece of a PostgreSQL
        binary COPY stream of `RESTORE_COPY_COLUMNS` (oldest first), each as its (experiment,
        user)'s latest; a NULL propensity is held as 0. `at_start`: `data` begins with the
        stream's header. A row cut off at the end is left unread, to be passed again with what
        follows. Returns (bytes read, assignments held, their distinct segment keys, whether
        the stream's trailer was read). ValueError if `data` is not such a stream."""

@final
class AssignmentLog:
    """New assignments of unary allocations not yet taken by the write-behind, as columns in
    Rust: `BatchCatalogue.allocate_one` appends to it, `take` empties it."""

    def __new__(cls, id_prefix: str) -> AssignmentLog:
        """An empty log of assignments named `{id_prefix}-{seq:x}`."""

    def __len__(self) -> int: ...
    @property
    def oldest_ms(self) -> int | None:
        """When (ms since the epoch) the oldest one was made; None when empty."""

    def take(self) -> MadeAssignments:
        """Everything logged, as one MadeAssignments; the log starts empty again."""

    def of_user(self, user_id: str) -> list[HeldTuple]:
        """The user's logged assignments, oldest first."""

    def forget_user(self, user_id: str) -> int:
        """Drop the user's logged assignments; how many there were."""

    def set_room(self, room: int) -> None:
        """Hold at most `room` assignments (those logged included): past it,
        `allocate_one` leaves new assignments to its caller, whose journal refuses them."""

    def count_days(self) -> None:
        """From now on, count each assignment logged by experiment and UTC day instead of
        keeping it (for a journal that keeps nothing else of them); what was kept stays."""

    def take_days(self) -> list[tuple[int, int, int]]:
        """(handle, UTC day number since the epoch, assignments) counted since the last call,
        sorted; empty unless `count_days` was called."""

@final
class MadeAssignments:
    """The new assignments of one call (a batch), for the write-behind: columns in Rust."""

    def __len__(self) -> int: ...
    @property
    def created_ms(self) -> int: ...
    def assignments(self) -> list[HeldTuple]:
        """Every assignment, in order."""

    def of_user(self, user_id: str) -> list[HeldTuple]: ...
    def without_user(self, user_id: str) -> MadeAssignments: ...
    def without(self, positions: Sequence[int]) -> MadeAssignments:
        """The same assignments without those at `positions`."""

    def level_counts(self) -> list[tuple[tuple[int, int], int]]:
        """((handle, cascade level), assignments) pairs."""

    def distinct_keys(self) -> list[tuple[int, str]]:
        """Distinct (handle, segment key) pairs."""
