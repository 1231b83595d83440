"""`Engine.decide` / `decide_batch` argument forms: lists and tuples of str are borrowed without
copies, any other sequence goes the general way; every form must decide exactly alike and bad
arguments must fail as before (TypeError naming the argument, ValueError from the core)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import pytest

from allocsvc.core import Engine, key_hash, path_keys, seed_rng

pytestmark = pytest.mark.unit

EXPERIMENT = 3
DIMENSIONS = ["country", "device", "source"]
VALUES = ["us", "mobile", "instagram"]
# (allocations, conversions) per variant at every node of VALUES' path: level 3 decides.
POSTERIOR = [(3000, 150), (3000, 180), (3000, 120)]


class Values(Sequence[str]):
    """A sequence that is neither a list nor a tuple."""

    def __init__(self, items: Sequence[str]) -> None:
        self._items = list(items)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)


def make_engine() -> Engine:
    engine = Engine()
    engine.configure(EXPERIMENT, variants=3, dimensions=DIMENSIONS, min_samples=[100, 50, 20])
    engine.load_counts(
        [
            (EXPERIMENT, key_hash(key), v, n, c, 0.0)
            for key in path_keys(DIMENSIONS, VALUES)
            for v, (n, c) in enumerate(POSTERIOR)
        ]
    )
    return engine


@pytest.mark.parametrize("record", [False, True])
def test_value_forms_decide_alike(record: bool) -> None:
    forms: list[Sequence[str]] = [
        VALUES,
        tuple(VALUES),
        Values(VALUES),
        [" US", "Mobile ", "INSTAGRAM"],
    ]
    runs = []
    for form in forms:
        engine = make_engine()
        seed_rng(17)
        decisions = [engine.decide(EXPERIMENT, f"user-{i}", form, record) for i in range(300)]
        counts = [engine.counts(EXPERIMENT, key) for key in path_keys(DIMENSIONS, VALUES)]
        runs.append((decisions, counts))
    assert all(run == runs[0] for run in runs[1:])
    decisions = runs[0][0]
    assert {d[3] for d in decisions} == {"country:us|device:mobile|source:instagram"}
    assert {d[1] for d in decisions} == {3}
    assert len({d[0] for d in decisions}) > 1
    allocated = sum(n for n, _c, _v in runs[0][1][0]) - sum(n for n, _c in POSTERIOR)
    assert allocated == (300 if record else 0)


def test_batch_forms_decide_alike_and_share_keys() -> None:
    users = [f"user-{i}" for i in range(200)]
    other = ["de", "desktop", "google"]
    rows = [VALUES if i % 50 < 30 else other for i in range(200)]
    forms: list[Sequence[Sequence[str]]] = [
        rows,
        tuple(tuple(r) for r in rows),
        [Values(r) for r in rows],
        [[f" {v.upper()}" for v in r] for r in rows],
    ]
    results = []
    for form in forms:
        engine = make_engine()
        seed_rng(5)
        results.append(engine.decide_batch(EXPERIMENT, users, form, record=True))
    assert all(r == results[0] for r in results[1:])
    keys = [d[3] for d in results[0]]
    assert keys == [
        "country:us|device:mobile|source:instagram"
        if r is VALUES
        else "country:de|device:desktop|source:google"
        for r in rows
    ]
    # The batch decides as single calls do, item by item, on the same generator.
    engine = make_engine()
    seed_rng(5)
    singles = [engine.decide(EXPERIMENT, u, r, True) for u, r in zip(users, rows, strict=True)]
    assert singles == results[0]


def test_bad_values_fail_as_before() -> None:
    engine = make_engine()
    with pytest.raises(TypeError, match="values"):
        engine.decide(EXPERIMENT, "u", ["us", 1, "x"], False)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="values"):
        engine.decide(EXPERIMENT, "u", "usx", False)
    with pytest.raises(ValueError, match="expected 3 values"):
        engine.decide(EXPERIMENT, "u", ("us", "mobile"), False)
    with pytest.raises(ValueError, match="expected 3 values"):
        engine.decide(EXPERIMENT, "u", ["x"] * 12, False)
    with pytest.raises(TypeError, match="values"):
        engine.decide_batch(EXPERIMENT, ["u"], [["us", None, "x"]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="values"):
        engine.decide_batch(EXPERIMENT, ["u"], ["usx"])
    with pytest.raises(ValueError, match=r"values\[1\]: expected 3 values"):
        engine.decide_batch(EXPERIMENT, ["u", "v"], [VALUES, ("us",)])
    with pytest.raises(ValueError, match="2 rows for 1 user ids"):
        engine.decide_batch(EXPERIMENT, ["u"], [VALUES, VALUES])
    with pytest.raises(KeyError):
        engine.decide(EXPERIMENT + 1, "u", VALUES, False)
    # Nothing above counted an allocation.
    assert engine.counts(EXPERIMENT, "country:us") == [(n, c, 0.0) for n, c in POSTERIOR]
