"""bench/load/run.py takes each setup's batch runs last: the durable server expands a batch
run's assignments from blocks into rows in the background for tens of seconds after it, and
the conversion and fixed-rate runs taken after the batches measured that expansion too (the
conversions' rate fell by a third, bench/RESULTS.md item 61). Its conversion runs name the
users allocated first, in turn (item 65)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from bench_support import load_bench

run = load_bench("bench_load_run", "run.py")

# req/s the stand-in for ghz answers for each unary concurrency
UNARY_RPS = {8: 100.0, 32: 300.0, 128: 200.0}


@pytest.mark.parametrize("quick", [False, True])
def test_batches_run_last_after_the_fixed_rate_and_the_conversions(
    monkeypatch: pytest.MonkeyPatch, quick: bool
) -> None:
    taken: list[tuple[Any, float, str]] = []

    def ghz_stand_in(_ghz: str, _setup: Any, shape: Any, seconds: float, name: str) -> dict:
        taken.append((shape, seconds, name))
        rps = UNARY_RPS[shape.concurrency] if shape.kind == "unary" and not shape.rps else 10.0
        return {"shape": shape, "rps": rps}

    monkeypatch.setattr(run, "run_ghz", ghz_stand_in)
    args = SimpleNamespace(quick=quick, warmup=1.0, duration=2.0, steady=3.0)
    shapes = run.plan(args)
    rows = run.measure("ghz", SimpleNamespace(name="w1"), shapes, args)

    kinds = [r["shape"].kind for r in rows]
    unary = sum(s.kind == "unary" for s in shapes)
    assert kinds[:unary] == ["unary"] * unary
    steady = rows[unary]["shape"]
    assert steady.kind == "unary"
    # 70% of the best unary run (c=32 in both plans)
    assert (steady.concurrency, steady.rps) == (32, 210)
    rest = kinds[unary + 1 :]
    assert rest == sorted(rest, key=["conversion", "batch"].index)
    assert "batch" in rest and "conversion" in rest
    assert len(rows) == len(shapes) + 1
    # The fixed-rate run lasts its own time; every other one is warmed up, then measured.
    assert [seconds for shape, seconds, _ in taken if shape.rps] == [3.0]
    # Each run has a name of its own: a conversion's idempotency key is made of it.
    names = [name for *_, name in taken]
    assert len(names) == len(set(names))


def test_conversions_name_the_preallocated_users_in_turn() -> None:
    # A conversion run of more calls than users allocated first converted users nobody had
    # allocated (NOT_FOUND) once ghz's request number passed them: ids now wrap (sprig's mod,
    # which ghz evaluates), while every call keeps an idempotency key of its own.
    data = run._data(run.Shape("conversion", 32), "w1-r3", users=500)
    assert data["user_id"] == "cv-{{mod .RequestNumber 500}}"
    assert data["idempotency_key"] == "w1-r3-{{.RequestNumber}}"
    default = run._data(run.Shape("conversion", 32), "w1-r4")
    assert default["user_id"] == f"cv-{{{{mod .RequestNumber {run.CONVERSION_USERS}}}}}"
