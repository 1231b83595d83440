"""The Rust counter store through `Engine`: exact sums under threads, deltas, loading."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from allocsvc.core import Engine, key_hash, parent_keys, path_keys, sample_beta

pytestmark = pytest.mark.unit

EXPERIMENT = 1
VARIANTS = 3
DIMENSIONS = ["country", "device"]
SEGMENTS = [["us", "mobile"], ["us", "desktop"], ["de", "mobile"], ["fr", "tablet"]]
THREADS = 8
BATCHES = 40
BATCH_SIZE = 250

# (segment hash, variant) -> (allocations, conversions, value sum)
Totals = dict[tuple[int, int], tuple[int, int, float]]


def configured_engine() -> Engine:
    engine = Engine()
    engine.configure(EXPERIMENT, variants=VARIANTS, dimensions=DIMENSIONS, min_samples=[50, 20])
    return engine


def run_worker(engine: Engine, worker: int, start: threading.Barrier) -> Totals:
    """Decide and convert from one thread; returns what it counted at every path level."""
    allocations: Counter[tuple[int, int]] = Counter()
    conversions: Counter[tuple[int, int]] = Counter()
    values: defaultdict[tuple[int, int], float] = defaultdict(float)
    start.wait()
    for b in range(BATCHES):
        segments = [SEGMENTS[(worker + b + i) % len(SEGMENTS)] for i in range(BATCH_SIZE)]
        users = [f"w{worker}-b{b}-u{i}" for i in range(BATCH_SIZE)]
        decisions = engine.decide_batch(EXPERIMENT, users, segments)
        for i, (variant, _level, _propensity, key) in enumerate(decisions):
            hashes = [key_hash(k) for k in parent_keys(key)]
            for h in hashes:
                allocations[h, variant] += 1
            if i % 3 == 0:
                # quarters add exactly in any order, so the value sums can be compared with ==
                value = 0.25 * (i % 5)
                engine.record_conversion(EXPERIMENT, key, variant, value)
                for h in hashes:
                    conversions[h, variant] += 1
                    values[h, variant] += value
            if i % 7 == 0:
                engine.record_allocation(EXPERIMENT, key, (variant + 1) % VARIANTS)
                for h in hashes:
                    allocations[h, (variant + 1) % VARIANTS] += 1
    return {k: (allocations[k], conversions[k], values[k]) for k in allocations | conversions}


def merge(parts: list[Totals]) -> Totals:
    out: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for part in parts:
        for k, (a, c, v) in part.items():
            out[k][0] += a
            out[k][1] += c
            out[k][2] += v
    return {k: (int(a), int(c), float(v)) for k, (a, c, v) in out.items()}


def sum_rows(rows: list[tuple[int, int, int, int, int, float]]) -> Totals:
    return merge([{(segment, variant): (a, c, v)} for _e, segment, variant, a, c, v in rows])


def all_path_keys() -> list[str]:
    return sorted({k for values in SEGMENTS for k in path_keys(DIMENSIONS, values)})


def test_increments_from_many_threads_sum_exactly() -> None:
    engine = configured_engine()
    start = threading.Barrier(THREADS + 1)
    exported: list[tuple[int, int, int, int, int, float]] = []
    done = threading.Event()

    def export_while_running() -> None:
        start.wait()
        while not done.is_set():
            exported.extend(engine.take_deltas())

    with ThreadPoolExecutor(THREADS + 1) as pool:
        exporter = pool.submit(export_while_running)
        workers = [pool.submit(run_worker, engine, w, start) for w in range(THREADS)]
        expected = merge([w.result() for w in workers])
        done.set()
        exporter.result()
    exported.extend(engine.take_deltas())

    decisions = THREADS * BATCHES * BATCH_SIZE
    global_hash = key_hash("")
    assert sum(expected[global_hash, v][0] for v in range(VARIANTS)) == decisions + sum(
        -(-BATCH_SIZE // 7) for _ in range(THREADS * BATCHES)
    )
    for key in all_path_keys():
        got = engine.counts(EXPERIMENT, key)
        assert len(got) == VARIANTS
        for variant, counts in enumerate(got):
            assert counts == expected.get((key_hash(key), variant), (0, 0, 0.0)), (key, variant)
    # Every increment is exported exactly once, even with exports racing the increments.
    assert sum_rows(exported) == expected
    assert {e for e, *_ in exported} == {EXPERIMENT}
    assert engine.take_deltas() == []


def ticks_during(call: Callable[[], object]) -> int:
    """How often another Python thread ran while `call` was running in this one.

    With a long switch interval the interpreter never forces this thread to hand over the GIL,
    so the other thread only runs while `call` releases it.
    """
    running = threading.Event()
    finished = threading.Event()
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        running.wait()
        while not finished.is_set():
            ticks += 1
            time.sleep(0)  # hands the GIL back as soon as the caller wants it

    ticker = threading.Thread(target=tick)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        ticker.start()
        running.set()
        call()
        finished.set()
    finally:
        finished.set()
        sys.setswitchinterval(interval)
        ticker.join()
    return ticks


def test_decide_batch_releases_the_gil() -> None:
    engine = configured_engine()
    engine.load_counts([(EXPERIMENT, key_hash(""), v, 1000, 50, 0.0) for v in range(VARIANTS)])
    users = [f"u{i}" for i in range(50_000)]
    values = [SEGMENTS[i % len(SEGMENTS)] for i in range(len(users))]
    assert ticks_during(lambda: engine.decide_batch(EXPERIMENT, users, values, record=False)) > 0
    # control: a call of similar length that keeps the GIL lets the other thread do nothing
    assert ticks_during(lambda: sample_beta(2.0, 3.0, 1_000_000)) == 0


def test_loaded_counts_are_not_deltas_and_add_up() -> None:
    engine = configured_engine()
    h = key_hash("country:us")
    engine.load_counts([(EXPERIMENT, h, 1, 100, 10, 5.0), (EXPERIMENT, h, 0, 40, 4, 1.0)])
    # a node made by loading is as wide as the highest variant loaded so far
    assert engine.counts(EXPERIMENT, "country:us") == [(40, 4, 1.0), (100, 10, 5.0)]
    assert engine.take_deltas() == [], "loaded state is not a delta"
    engine.load_counts([(EXPERIMENT, h, 1, 1, 1, 0.5)], replace=False)
    assert engine.counts(EXPERIMENT, "country:us")[1] == (101, 11, 5.5)
    assert engine.take_deltas() == []


def test_replace_sets_totals_and_keeps_unexported_deltas() -> None:
    engine = configured_engine()
    key = "country:us"
    h = key_hash(key)
    engine.load_counts([(EXPERIMENT, h, 1, 100, 10, 5.0)])
    engine.record_allocation(EXPERIMENT, key, 1)
    engine.record_conversion(EXPERIMENT, key, 1, 2.0)
    assert engine.counts(EXPERIMENT, key)[1] == (101, 11, 7.0)

    engine.load_counts([(EXPERIMENT, h, 1, 500, 50, 25.0)], replace=True)
    assert engine.counts(EXPERIMENT, key)[1] == (501, 51, 27.0), "pending increments are kept"
    deltas = sum_rows(engine.take_deltas())
    assert deltas[h, 1] == (1, 1, 2.0)
    assert deltas[key_hash(""), 1] == (1, 1, 2.0)

    # Once exported, a replace sets exactly the loaded totals.
    engine.load_counts([(EXPERIMENT, h, 1, 7, 3, 1.5)], replace=True)
    assert engine.counts(EXPERIMENT, key)[1] == (7, 3, 1.5)
    assert engine.take_deltas() == []


def test_counts_of_unknown_nodes_are_empty() -> None:
    engine = configured_engine()
    assert engine.counts(EXPERIMENT, "country:nowhere") == []
    assert engine.counts(99, "") == []
    assert engine.node_count() == 0


def test_decide_records_at_every_level_only_when_asked() -> None:
    engine = configured_engine()
    engine.decide(EXPERIMENT, "u", ["US", "Mobile"], record=False)
    assert engine.node_count() == 0
    assert engine.take_deltas() == []
    variant, _level, _p, key = engine.decide(EXPERIMENT, "u", ["US", "Mobile"])
    assert key == "country:us|device:mobile"
    for k in parent_keys(key):
        counts = engine.counts(EXPERIMENT, k)
        assert [a for a, _, _ in counts] == [int(v == variant) for v in range(VARIANTS)]
    assert engine.node_count() == 3
    exported = sorted(r[1] for r in engine.take_deltas())
    assert exported == sorted(key_hash(k) for k in parent_keys(key))


def test_loaded_counts_survive_configure_and_vanish_with_remove() -> None:
    engine = Engine()
    engine.load_counts([(7, key_hash(""), 0, 10, 1, 0.0)])
    engine.configure(7, variants=2, dimensions=[], min_samples=[])
    assert engine.counts(7, "")[0] == (10, 1, 0.0)
    engine.configure(7, variants=2, dimensions=["device"], min_samples=[5])
    assert engine.counts(7, "")[0] == (10, 1, 0.0), "reconfiguring keeps counters"
    engine.remove(7)
    assert not engine.has_experiment(7)
    assert engine.counts(7, "") == []
