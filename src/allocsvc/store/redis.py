"""State shared between replicas through Redis: posterior counts and sticky assignments.

Keys (hash tags keep one experiment's keys on one Redis Cluster slot):
- `{ns}:{x<handle>}:counts`   hash: `<segment hash>:<variant>:a|c|v` -> totals of every replica
- `{ns}:{x<handle>}:seeded`   set once the counts hash was seeded from a replica's totals
- `{ns}:{x<handle>}:sticky`   hash: user id -> assignment (JSON); a batch's users are looked
  up by one script call (`_LOOKUP`) and its new ones claimed by another (`_CLAIM`, HSETNX each);
  unary calls' new users are claimed together, one script call per round (`_CLAIM_KEPT`)
- `{ns}:asg:<assignment id>`  assignment (JSON), for conversions arriving at another replica;
  set with the next push, by a script that takes a framed blob of them (a batch's built in
  Rust), not by a command each (a unary claim's, by its claim)

Each replica pushes its deltas (HINCRBY / HINCRBYFLOAT, in bounded pipelines) and replaces its view
of the totals with the merged ones (its unpushed deltas kept on top). When Redis is down, the
replica serves from memory, keeps its deltas, reports itself degraded, and pushes and
re-seeds when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from allocsvc.allocation.journal import AssignmentPart, assignment_parts
from allocsvc.allocation.service import Assignment
from allocsvc.core import framed, shared_records, sticky_claims
from allocsvc.store.pump import CountRow, DeltaPump
from allocsvc.store.rounds import Rounds
from allocsvc.tasks.scheduler import stop_tasks

if TYPE_CHECKING:
    from allocsvc.core import MadeAssignments

log = logging.getLogger(__name__)
SINK = "redis"
ASSIGNMENT_TTL_SECONDS = 30 * 24 * 3600
# Reads ARGV[1]: fields, each preceded by its length (4 bytes, big-endian).
_FIELDS = """
local blob = ARGV[1]
local pos = 1
local function field()
  local n = struct.unpack('>I4', blob, pos)
  local text = string.sub(blob, pos + 4, pos + 3 + n)
  pos = pos + 4 + n
  return text
end
local out = {}
local i = 0
"""
# Sets every record of ARGV[1] (a key, then its value) to expire in ARGV[2] seconds; returns
# how many. Its keys are not declared in KEYS: a standalone Redis, as this module's client is (a
# batch's ids span every slot).
_SET_RECORDS = (
    _FIELDS
    + """
while pos <= #blob do
  local key = field()
  redis.call('SET', key, field(), 'EX', ARGV[2])
  i = i + 1
end
return i
"""
)
# Records per script call, about: Redis runs a script alone (about 1 ms per 1,000 here).
_RECORDS_PER_CALL = 2_000
# Records of new assignments kept for the next push at most (while Redis is down, or slower
# than the replica makes them; a batch's take about 50 bytes each and the user id). Past it
# the oldest are dropped (counted): a conversion by id at another replica then finds its
# assignment in PostgreSQL instead.
MAX_PENDING_RECORDS = 1_000_000
# Script calls per pipeline of a push: about 20 ms of Redis and 3 MB sent, well inside the
# client's timeout (0.5 s by default), however many records a push has to write.
_CALLS_PER_PIPELINE = 10
# Both answer in one string (a reply of an element per user costs redis-py ~2 us each to
# parse): for each user with a sticky assignment, its number in ARGV[1] (from 0) and the
# assignment, each framed. _LOOKUP's ARGV[1]: (key of sticky assignments, user id) pairs.
_LOOKUP = (
    _FIELDS
    + """
while pos <= #blob do
  local key = field()
  local found = redis.call('HGET', key, field())
  if found then
    out[#out + 1] = struct.pack('>I4>I4', i, #found) .. found
  end
  i = i + 1
end
return table.concat(out)
"""
)
# _CLAIM's ARGV[1]: (key, user id, assignment) triples; a user's assignment is set unless it
# has one (HSETNX), which is answered. Undeclared keys, as _SET_RECORDS. _CLAIM_KEPT's:
# quadruples, the fourth the assignment's record key, set (to expire in ARGV[2] seconds) when
# its claim stands: unary calls' claims, taken together (`RedisShared.claim`).
_CLAIMS = (
    _FIELDS
    + """
while pos <= #blob do
  local key = field()
  local user = field()
  local value = field()
  local record = RECORD
  if redis.call('HSETNX', key, user, value) == 1 then
    if record then
      redis.call('SET', record, value, 'EX', ARGV[2])
    end
  else
    local found = redis.call('HGET', key, user)
    out[#out + 1] = struct.pack('>I4>I4', i, #found) .. found
  end
  i = i + 1
end
return table.concat(out)
"""
)
_CLAIM = _CLAIMS.replace("RECORD", "false")
_CLAIM_KEPT = _CLAIMS.replace("RECORD", "field()")


def _numbered(reply: bytes) -> Iterator[tuple[int, Assignment]]:
    """The (number, assignment) pairs of a _LOOKUP or _CLAIM reply."""
    at = 0
    while at < len(reply):
        number = int.from_bytes(reply[at : at + 4], "big")
        size = int.from_bytes(reply[at + 4 : at + 8], "big")
        found = _decode(reply[at + 8 : at + 8 + size])
        at += 8 + size
        if found is not None:
            yield number, found


def _encode(a: Assignment) -> str:
    """The assignment's fields as a JSON array, in field order (a NamedTuple is a tuple)."""
    return json.dumps(a)


def _decode(raw: bytes | str | None) -> Assignment | None:
    if raw is None:
        return None
    f = json.loads(raw)
    return Assignment(
        id=f[0],
        experiment_key=f[1],
        handle=int(f[2]),
        user_id=f[3],
        variant=int(f[4]),
        segment_key=f[5],
        cascade_level=int(f[6]),
        propensity=float(f[7]),
        created_ms=int(f[8]),
    )


class RedisShared:
    """Shared counts and sticky assignments. Hot-path calls never raise: a Redis failure marks
    the replica degraded and the caller falls back to its own memory."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "allocsvc",
        push_interval: float = 0.1,
        refresh_interval: float = 0.5,
        timeout: float = 0.5,
        max_pending_records: int = MAX_PENDING_RECORDS,
    ) -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._ns = namespace
        self._push_interval = push_interval
        self._refresh_interval = refresh_interval
        self._pump: DeltaPump | None = None
        self._load_counts: Callable[[list[CountRow]], None] | None = None
        self._snapshot: Callable[[int], list[CountRow]] | None = None
        self._experiments: Callable[[], Iterable[int]] = list
        self._on_health: Callable[[bool], None] = lambda healthy: None
        self._task: asyncio.Task[None] | None = None
        self._pending_assignments: list[Assignment] = []
        self._pending_made: list[MadeAssignments] = []
        self._max_pending_records = max_pending_records
        self.dropped_records = 0
        self._dropping = False
        # Set while a push writes what it took from the pending lists (see `erase_user`).
        self._pushing: asyncio.Event | None = None
        self._set_records = self._redis.register_script(_SET_RECORDS)
        self._claim = self._redis.register_script(_CLAIM)
        self._claim_kept = self._redis.register_script(_CLAIM_KEPT)
        self._claims: Rounds[None, Assignment, Assignment] = Rounds(self._claim_round)
        self._lookup = self._redis.register_script(_LOOKUP)
        self.healthy = True

    def _key(self, handle: int, what: str) -> str:
        return f"{self._ns}:{{x{handle}}}:{what}"

    def bind(
        self,
        pump: DeltaPump,
        load_counts: Callable[[list[CountRow]], None],
        snapshot: Callable[[int], list[CountRow]],
        experiments: Callable[[], Iterable[int]],
        on_health: Callable[[bool], None],
    ) -> None:
        pump.add_sink(SINK)
        self._pump = pump
        self._load_counts = load_counts
        self._snapshot = snapshot
        self._experiments = experiments
        self._on_health = on_health

    def _mark(self, healthy: bool, error: BaseException | None = None) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            if healthy:
                log.info("redis is back")
            else:
                log.warning("redis unavailable, serving from memory", extra={"error": repr(error)})
            self._on_health(healthy)

    # Sticky assignments and lookups: a round trip only on a local miss.

    async def sticky(self, handle: int, user_id: str) -> Assignment | None:
        if not self.healthy:
            return None
        try:
            return _decode(await self._redis.hget(self._key(handle, "sticky"), user_id))
        except (RedisError, OSError) as exc:
            self._mark(False, exc)
            return None

    async def claim(self, assignment: Assignment) -> Assignment:
        """Make this the user's sticky assignment unless another replica was first (then
        return the one that stands), with its record for lookups by id. Claims made meanwhile
        by other calls wait for the round under way and go in the next together, one script
        call for all."""
        if not self.healthy:
            return assignment
        try:
            standing = await self._claims.find(None, [assignment])
        except (RedisError, OSError) as exc:
            self._mark(False, exc)
            return assignment
        return standing.get(assignment, assignment)

    async def _claim_round(self, _: None, claims: list[Assignment]) -> dict[Assignment, Assignment]:
        """One `_CLAIM_KEPT` call: the standing assignments of the claims that lost."""
        blob = framed(
            [
                text
                for a in claims
                for text in (
                    self._key(a.handle, "sticky"),
                    a.user_id,
                    _encode(a),
                    f"{self._ns}:asg:{a.id}",
                )
            ]
        )
        reply = await self._claim_kept(args=[blob, ASSIGNMENT_TTL_SECONDS])
        return {claims[i]: a for i, a in _numbered(reply)}

    async def sticky_many(
        self, wanted: Sequence[tuple[int, str]]
    ) -> dict[tuple[int, str], Assignment]:
        """The sticky assignments found of these (handle, user id) pairs, in one script
        call."""
        if not self.healthy or not wanted:
            return {}
        keys = {handle: self._key(handle, "sticky") for handle in {h for h, _ in wanted}}
        try:
            reply = await self._lookup(args=[framed([t for h, u in wanted for t in (keys[h], u)])])
        except (RedisError, OSError) as exc:
            self._mark(False, exc)
            return {}
        return {wanted[i]: a for i, a in _numbered(reply)}

    async def claim_made(
        self, made: MadeAssignments, sticky: Iterable[int]
    ) -> dict[int, Assignment]:
        """Claim a batch's new assignments of sticky experiments (`sticky`: their handles) in
        one script call; return, by position in `made`, those that stand instead. Their
        records for lookups by id go with the next push (`assignments_made`)."""
        keys = {handle: self._key(handle, "sticky") for handle in sticky}
        if not self.healthy or not keys:
            return {}
        blob, claimed = sticky_claims(made, keys)
        if not claimed:
            return {}
        try:
            reply = await self._claim(args=[blob])
        except (RedisError, OSError) as exc:
            self._mark(False, exc)
            return {}
        return {claimed[i]: a for i, a in _numbered(reply)}

    def assignment_made(self, assignment: Assignment) -> None:
        """Publish a (non-sticky) assignment for lookups by id, with the next push."""
        self._pending_assignments.append(assignment)

    def assignments_made(self, made: MadeAssignments) -> None:
        """Publish a batch's new assignments (those of sticky experiments claimed already) for
        lookups by id, with the next push."""
        self._pending_made.append(made)

    async def assignment(self, assignment_id: str) -> Assignment | None:
        if not self.healthy:
            return None
        try:
            return _decode(await self._redis.get(f"{self._ns}:asg:{assignment_id}"))
        except (RedisError, OSError) as exc:
            self._mark(False, exc)
            return None

    async def forget_users(self, handle: int, user_ids: Sequence[str]) -> None:
        if user_ids:
            await self._redis.hdel(self._key(handle, "sticky"), *user_ids)

    # Personal data (export and erasure). These raise on Redis errors: an erasure that did
    # not happen must not look done.

    async def user_keys(self, user_id: str, handles: Iterable[int]) -> dict[str, Assignment]:
        """Every key holding this user's data: sticky entries as `<sticky key>#<user id>`, and
        the assignment records (found by scanning, so other replicas' are found too)."""
        found: dict[str, Assignment] = {}
        for handle in handles:
            key = self._key(handle, "sticky")
            standing = _decode(await self._redis.hget(key, user_id))
            if standing is not None:
                found[f"{key}#{user_id}"] = standing
        pattern = f"{self._ns}:asg:*"
        batch: list[bytes | str] = []
        async for key in self._redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                found.update(await self._users_assignments(batch, user_id))
                batch = []
        if batch:
            found.update(await self._users_assignments(batch, user_id))
        for a in self._pending_of(user_id):
            found.setdefault(f"{self._ns}:asg:{a.id}", a)
        return found

    def _pending_of(self, user_id: str) -> list[Assignment]:
        """The user's assignments waiting for the next push."""
        pending = [a for a in self._pending_assignments if a.user_id == user_id]
        for made in self._pending_made:
            pending += map(Assignment._make, made.of_user(user_id))
        return pending

    async def _users_assignments(
        self, keys: Sequence[bytes | str], user_id: str
    ) -> dict[str, Assignment]:
        out: dict[str, Assignment] = {}
        for key, raw in zip(keys, await self._redis.mget(keys), strict=True):
            a = _decode(raw)
            if a is not None and a.user_id == user_id:
                out[key.decode() if isinstance(key, bytes) else key] = a
        return out

    async def erase_user(self, user_id: str, handles: Iterable[int]) -> int:
        """Delete every sticky entry and assignment record of the user (those waiting for the
        next push dropped first, so that no push writes them after); return how many."""
        # A push under way may hold the user's records: it writes them before the scan below
        # finds them, or (failed, cancelled) puts them back in the pending lists to drop.
        while self._pushing is not None:
            await self._pushing.wait()
        dropped = {f"{self._ns}:asg:{a.id}" for a in self._pending_of(user_id)}
        self._pending_assignments = [a for a in self._pending_assignments if a.user_id != user_id]
        self._pending_made = [m.without_user(user_id) for m in self._pending_made]
        found = await self.user_keys(user_id, handles)
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in found:
                key, _, field = name.partition("#")
                if field:
                    pipe.hdel(key, field)
                else:
                    pipe.delete(key)
            await pipe.execute()
        return len(found.keys() | dropped)

    # Counts: push deltas, refresh the merged view.

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="redis-sync")

    async def close(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
        with contextlib.suppress(RedisError, OSError):
            await self.push()
        await self._redis.aclose()

    @property
    def pending_records(self) -> int:
        """Records of new assignments waiting for the next push."""
        return len(self._pending_assignments) + sum(len(m) for m in self._pending_made)

    def statistics(self) -> dict[str, float]:
        return {"pending_records": self.pending_records, "dropped_records": self.dropped_records}

    def _bound_pending(self) -> None:
        """Drop the oldest pending records past `max_pending_records` (batches' first)."""
        excess = self.pending_records - self._max_pending_records
        if excess <= 0:
            return
        before = self.dropped_records
        while excess > 0 and self._pending_made:
            n = len(self._pending_made.pop(0))
            excess -= n
            self.dropped_records += n
        if excess > 0:
            del self._pending_assignments[:excess]
            self.dropped_records += excess
        if not self._dropping:
            # Once until a push succeeds again (the counter has the rest).
            self._dropping = True
            log.warning(
                "assignment records dropped: Redis is behind or down",
                extra={"dropped": self.dropped_records - before, "kept": self.pending_records},
            )

    async def _loop(self) -> None:
        since_refresh = 0.0
        while True:
            await asyncio.sleep(self._push_interval)
            since_refresh += self._push_interval
            self._bound_pending()
            try:
                if not self.healthy:
                    await self._redis.ping()
                await self.seed_missing()
                await self.push()
                self._dropping = False
                if since_refresh >= self._refresh_interval:
                    since_refresh = 0.0
                    await self.refresh()
                self._mark(True)
            except (RedisError, OSError) as exc:
                self._mark(False, exc)

    async def seed_missing(self) -> None:
        """Seed each experiment's counts hash from this replica's totals if nobody has (new
        Redis, or Redis lost its data); the first replica to get the marker writes."""
        assert self._pump is not None and self._snapshot is not None
        for handle in self._experiments():
            if await self._redis.exists(self._key(handle, "seeded")):
                continue
            if not await self._redis.set(self._key(handle, "seeded"), "1", nx=True):
                continue
            # The snapshot includes every delta taken so far: drop those from the push buffer.
            self._pump.pump()
            self._pump.discard(SINK, handle)
            rows = self._snapshot(handle)
            if rows:
                await self._redis.hset(self._key(handle, "counts"), items=_fields(rows))
            log.info("seeded shared counts", extra={"experiment": handle, "rows": len(rows)})

    async def push(self) -> None:
        """Write the counts' deltas and the assignment records made since the last push, in
        pipelines of at most `_CALLS_PER_PIPELINE` script calls: each answered well inside the
        client's timeout however many records waited (a push of all at once, after a burst of
        batches, timed out, and each retry was larger: bench/RESULTS.md item 39)."""
        assert self._pump is not None
        rows = self._pump.drain(SINK)
        assignments, self._pending_assignments = self._pending_assignments, []
        made, self._pending_made = self._pending_made, []
        if not rows and not assignments and not made:
            return
        parts = assignment_parts(assignments, made, _RECORDS_PER_CALL)
        pushing = self._pushing = asyncio.Event()
        try:
            while rows or parts:
                taken = parts[:_CALLS_PER_PIPELINE]
                await self._write(rows, taken)
                rows, parts = [], parts[len(taken) :]
        except BaseException as exc:
            # Not written (or not known to be): keep for the next push (close() pushes after
            # cancelling the loop, which may cancel a push). Records are set again harmlessly;
            # counts only after a Redis error: a pipeline that failed half way may apply twice
            # (counts are approximate across an outage, Postgres holds the exact conversion
            # counts).
            self._pending_assignments[:0] = [a for _, singles, _ in parts for a in singles]
            self._pending_made[:0] = [m for group, _, _ in parts for m in group]
            if rows and isinstance(exc, (RedisError, OSError)):
                self._pump.restore(SINK, rows)
            raise
        finally:
            if self._pushing is pushing:
                self._pushing = None
            pushing.set()

    async def _write(self, rows: list[CountRow], parts: list[AssignmentPart]) -> None:
        """One pipeline: the counts' deltas, and these parts' records (a script call each)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for e, s, v, a, k, x in rows:
                key = self._key(e, "counts")
                if a:
                    pipe.hincrby(key, f"{s}:{v}:a", a)
                if k:
                    pipe.hincrby(key, f"{s}:{v}:c", k)
                if x:
                    pipe.hincrbyfloat(key, f"{s}:{v}:v", x)
            if parts:
                # Built off the event loop (Rust, without the GIL).
                for records in await asyncio.to_thread(self._records, parts):
                    args: list[int | bytes] = [records, ASSIGNMENT_TTL_SECONDS]
                    await self._set_records(args=args, client=pipe)
            await pipe.execute()

    def _records(self, parts: Sequence[AssignmentPart]) -> list[bytes]:
        """The records (`_SET_RECORDS`) of these parts (`assignment_parts`), a blob each."""
        prefix = f"{self._ns}:asg:"
        return [shared_records(group, prefix, singles) for group, singles, _ in parts]

    async def refresh(self) -> None:
        assert self._load_counts is not None
        for handle in self._experiments():
            raw = await self._redis.hgetall(self._key(handle, "counts"))
            self._load_counts(_rows(handle, raw))


def _fields(rows: list[CountRow]) -> list[str]:
    """Field, value, field, value, ... of the counts hash for these totals."""
    items: list[str] = []
    for _, s, v, a, k, x in rows:
        items += [f"{s}:{v}:a", str(a), f"{s}:{v}:c", str(k), f"{s}:{v}:v", repr(x)]
    return items


def _rows(handle: int, raw: Mapping[bytes | str, bytes | str]) -> list[CountRow]:
    merged: dict[tuple[int, int], list[float]] = {}
    for field, value in raw.items():
        name = field.decode() if isinstance(field, bytes) else field
        segment, variant, kind = name.split(":")
        acc = merged.setdefault((int(segment), int(variant)), [0, 0, 0.0])
        acc["acv".index(kind)] = float(value) if kind == "v" else int(value)
    return [(handle, s, v, int(a), int(c), float(x)) for (s, v), (a, c, x) in merged.items()]
