"""Unary allocations' new assignments reach PostgreSQL through the Rust log the write-behind
takes (`AssignmentLog`): held and counted as they are made, written with the columns they are
held with, each with its own time, under the write-behind's bound, exported and erased before
the flush like any buffered assignment, and timed from their own creation."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime

import pytest
from store_support import COUNTRIES, HELD_COLUMNS, as_row, assignment_rows, batch_service

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation import service as service_module
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import AllocationService
from allocsvc.api import convert
from allocsvc.errors import ResourceExhausted
from allocsvc.store import PostgresStore
from allocsvc.store.writebehind import PostgresJournal

pytestmark = pytest.mark.integration


async def _service(journal: PostgresJournal | MemoryJournal) -> AllocationService:
    return await batch_service(journal, (("sticky", True), ("fresh", False)))


def _request(experiment: str, user: str, country: str = "us") -> bytes:
    return pb.AllocateRequest(
        experiment_id=experiment, user_id=user, context={"country_code": country}
    ).SerializeToString()


def _answer(response: bytes | None) -> pb.AllocateResponse:
    assert response is not None
    return pb.AllocateResponse.FromString(response)


def _batch(service: AllocationService, experiment: str, users: list[str]) -> None:
    """Allocate `users` in `experiment` as one AllocateBatch (held by Rust, handed over whole)."""
    prepared = service.prepare_batch(
        pb.AllocateBatchRequest(
            requests=[pb.AllocateRequest(experiment_id=experiment, user_id=u) for u in users]
        ).SerializeToString()
    )
    assert prepared is not None
    service.finish_batch(prepared, "", {}, {})


async def test_unary_assignments_are_held_counted_and_written_from_the_log(
    store: PostgresStore, migrated_db: str
) -> None:
    journal = PostgresJournal(store)
    service = await _service(journal)
    answers = []
    for i in range(30):
        answers.append(
            _answer(service.allocate_wire(_request("fresh", f"u{i}", COUNTRIES[i % 3]), ""))
        )
        if i % 10 == 9:
            await asyncio.sleep(0.003)  # assignments made at different times
    first = _answer(service.allocate_wire(_request("sticky", "returning"), ""))
    again = _answer(service.allocate_wire(_request("sticky", "returning"), ""))
    # A batch and a Python-path allocation in the same flush as the logged ones.
    _batch(service, "fresh", ["b1"])
    python_path = await service.allocate(
        convert.allocate_request(pb.AllocateRequest(experiment_id="fresh", user_id="p1"))
    )

    # The sticky user got the same assignment back, from memory, without a new one.
    assert again.sticky and not first.sticky
    assert again.assignment_id == first.assignment_id
    assert len({a.assignment_id for a in answers} | {first.assignment_id}) == 31
    # Nothing per assignment went through Python: the log holds the unary calls' ones.
    assert journal._assignments == [python_path.assignment]
    assert journal.stats.pending_assignments == 0 and journal._pending() == 33
    fresh = service.get_experiment("fresh").handle
    assert service.cascade_counts(fresh)[1][0] == 32  # 30 unary, the batch's, p1 (level 1)
    # b1 and p1 sent no country.
    keys = {f"country:{c}" for c in (*COUNTRIES, "unknown")}
    assert {k for k, _ in service.segment_keys(fresh)} == {"", *keys}
    held = {a.id: a for u in [f"u{i}" for i in range(30)] for a in service.user_assignments(u)}
    assert set(held) == {a.assignment_id for a in answers}
    times = sorted({a.created_ms for a in held.values()})
    assert len(times) >= 2, "the calls were made in different milliseconds"
    # Exported before the flush as held.
    pending = journal.pending_assignments_of("u29")
    assert [(r.id, r.variant, r.segment_key, r.cascade_level) for r in pending] == [
        (a.id, a.variant, a.segment_key, a.cascade_level) for a in service.user_assignments("u29")
    ]

    await journal.flush()
    assert journal.stats.assignments_written == 33 and journal._pending() == 0
    rows = await assignment_rows(migrated_db, HELD_COLUMNS)
    assert len(rows) == 33
    held[first.assignment_id] = service.user_assignments("returning")[0]
    for a in held.values():
        assert rows[a.id] == as_row(a)
    for answer in answers:
        row = rows[answer.assignment_id]
        assert (row[4], row[6]) == (answer.segment_key, answer.cascade_level)
    await journal.flush()
    assert journal.stats.assignments_written == 33
    await journal.close()


async def test_the_write_behind_bound_counts_the_logged_assignments(
    store: PostgresStore,
) -> None:
    journal = PostgresJournal(store, max_pending_assignments=5)
    service = await _service(journal)
    # Five pending, of every path: Rust checks the room the journal shares with its log.
    first = _answer(service.allocate_wire(_request("sticky", "returning"), ""))
    for i in range(2):
        _answer(service.allocate_wire(_request("fresh", f"u{i}"), ""))
    await service.allocate(
        convert.allocate_request(pb.AllocateRequest(experiment_id="fresh", user_id="p1"))
    )
    _batch(service, "fresh", ["b1"])
    # Full: the wire path hands a new assignment over, and the Python path refuses it.
    assert service.allocate_wire(_request("fresh", "u5"), "") is None
    with pytest.raises(ResourceExhausted):
        await service.allocate(
            convert.allocate_request(pb.AllocateRequest(experiment_id="fresh", user_id="u5"))
        )
    # A returning user makes no new assignment: Rust still answers them.
    again = _answer(service.allocate_wire(_request("sticky", "returning"), ""))
    assert again.sticky and again.assignment_id == first.assignment_id
    await journal.flush()
    _answer(service.allocate_wire(_request("fresh", "u5"), ""))
    await journal.close()


async def test_a_user_erased_before_the_flush_leaves_the_log(
    store: PostgresStore, migrated_db: str
) -> None:
    journal = PostgresJournal(store)
    service = await _service(journal)
    for i in range(10):
        _answer(service.allocate_wire(_request("fresh", f"u{i}"), ""))
        _answer(service.allocate_wire(_request("sticky", f"u{i}"), ""))

    async def nothing() -> int:
        return 0

    dropped, _ = await journal.without_user("u3", nothing)
    forgotten = service.forget_user("u3")
    assert sorted(r.id for r in dropped) == sorted(a.id for a in forgotten)
    assert len(dropped) == 2
    assert journal.pending_assignments_of("u3") == []
    await journal.flush()
    rows = await assignment_rows(migrated_db, HELD_COLUMNS)
    assert len(rows) == 18
    assert "u3" not in {r[2] for r in rows.values()}
    await journal.close()


async def test_a_flush_is_timed_from_the_oldest_logged_assignment(
    store: PostgresStore,
) -> None:
    journal = PostgresJournal(store)
    service = await _service(journal)
    _answer(service.allocate_wire(_request("fresh", "early"), ""))
    await asyncio.sleep(0.2)
    _answer(service.allocate_wire(_request("fresh", "late"), ""))
    await journal.flush()
    assert journal.stats.assignments_written == 2
    # At least the 200 ms the first one waited (a lower bound: nothing can make it shorter).
    assert journal.stats.last_flush_lag_ms >= 200
    await journal.close()


async def test_a_memory_journal_counts_each_unary_assignment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    journal = MemoryJournal()
    service = await _service(journal)
    # Two calls in the last millisecond of a UTC day, three in the first of the next.
    late = int(datetime(2026, 3, 1, 23, 59, 59, 999_000, tzinfo=UTC).timestamp() * 1000)
    clock = iter([late, late, late + 1, late + 1, late + 1])
    monkeypatch.setattr(service_module, "_now_ms", lambda: next(clock))
    answers = [_answer(service.allocate_wire(_request("fresh", f"u{i}"), "")) for i in range(5)]
    assert journal.assignments == 5
    handle = service.get_experiment("fresh").handle
    days = [(d.day, d.visitors) for d in await journal.traffic(handle)]
    assert days == [(date(2026, 3, 1), 2), (date(2026, 3, 2), 3)]
    # Counted in Rust, taken once: asked again, the same.
    assert journal.assignments == 5
    assert [(d.day, d.visitors) for d in await journal.traffic(handle)] == days
    # Held by Rust, with their own times; the journal's log keeps counts, no rows.
    held = [service.user_assignments(f"u{i}") for i in range(5)]
    assert [[a.id for a in h] for h in held] == [[a.assignment_id] for a in answers]
    assert [h[0].created_ms for h in held] == [late, late, late + 1, late + 1, late + 1]
    assert service.cascade_counts(handle)[1][0] == 5
    assert [len(log) for log in journal._logs] == [0]


async def test_growth_is_reported_once_per_every_new_assignment_of_any_path() -> None:
    service = await _service(MemoryJournal())
    fresh = service.get_experiment("fresh").handle
    sticky = service.get_experiment("sticky").handle
    woken: list[set[int]] = []
    service.on_growth(woken.append, every=10)
    # Counted in Rust (`UnaryLane`) for unary calls it answers whole, in Python for the rest.
    for i in range(15):
        _answer(service.allocate_wire(_request("fresh", f"w{i}"), ""))
    assert woken == [{fresh}]
    for i in range(4):
        await service.allocate(
            convert.allocate_request(pb.AllocateRequest(experiment_id="sticky", user_id=f"d{i}"))
        )
    assert woken == [{fresh}], "19 so far"
    _batch(service, "sticky", [f"b{i}" for i in range(6)])
    assert woken == [{fresh}, {fresh, sticky}]
    # Returning users make no new assignment: they count for nothing.
    for i in range(9):
        assert _answer(service.allocate_wire(_request("sticky", f"d{i % 4}"), "")).sticky
        _answer(service.allocate_wire(_request("fresh", f"x{i}"), ""))
    assert len(woken) == 2
    _answer(service.allocate_wire(_request("fresh", "x9"), ""))
    assert woken == [{fresh}, {fresh, sticky}, {fresh}]
    assert service.cascade_counts(fresh)[1][0] == 25
    assert service.cascade_counts(sticky)[1][0] == 10


async def test_a_servers_unary_path_answers_as_allocate_wire_does() -> None:
    """`unary_path`, the Rust method a server's Allocate tries first, reads the clock itself
    and calls back into Python for what is left of a call: growth, new segment keys, a user
    agent to classify, a request the caller's path must word."""
    journal = MemoryJournal()
    service = await _service(journal)
    fresh = service.get_experiment("fresh").handle
    woken: list[set[int]] = []
    service.on_growth(woken.append, every=10)
    path = service.unary_path("eu")
    start = service_module._now_ms()
    answers = [_answer(path(_request("fresh", f"p{i}", COUNTRIES[i % 3]))) for i in range(10)]
    end = service_module._now_ms()
    assert woken == [{fresh}]
    assert {a.region for a in answers} == {"eu"}
    assert len({a.segment_key for a in answers}) == 3
    assert {k for k, _ in service.segment_keys(fresh)} >= {a.segment_key for a in answers}
    held = [service.user_assignments(f"p{i}") for i in range(10)]
    assert [[h.id for h in one] for one in held] == [[a.assignment_id] for a in answers]
    assert all(start <= one[0].created_ms <= end for one in held)
    assert service.cascade_counts(fresh)[1][0] == 10
    assert journal.assignments == 10
    # A returning sticky user is given their assignment again, by either entry.
    first = _answer(path(_request("sticky", "returning")))
    assert not first.sticky
    first.sticky = True
    assert _answer(service.allocate_wire(_request("sticky", "returning"), "eu")) == first
    assert _answer(path(_request("sticky", "returning"))) == first
    # A user agent not classified yet: classified in Python, then decided.
    phone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148"
    request = pb.AllocateRequest(
        experiment_id="fresh", user_id="phone", context={"user_agent": phone}
    ).SerializeToString()
    assert _answer(path(request)).experiment_id == "fresh"
    assert service.user_assignments("phone")[0].experiment_key == "fresh"
    # What the caller's path must answer (and word): declined.
    assert path(_request("fresh", "")) is None
    assert path(b"\xff\xff") is None
