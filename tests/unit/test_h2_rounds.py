"""bench/load/h2.py judges a ratio taken from alternating rounds only on enough calm rounds:
one uncontended round called the unary bar met in one run and missed in the next. It also says
when a durable batch run reached the block bound, past which refusals are the bound's, and
raises that bound for its durable setups so that a batch row measures the rate."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from bench_support import load_bench

from allocsvc.config import Settings
from allocsvc.store.writebehind import PostgresJournal

h2 = load_bench("bench_load_h2", "h2.py")


def _rounds(*rows: tuple[str, float, float]) -> list[dict[str, object]]:
    """Alternating rows: (setup, req/s, cores taken by other work and steal), round by round
    for the setups in the order given, two setups per round."""
    out: list[dict[str, object]] = []
    for i, (setup, rps, taken) in enumerate(rows):
        out.append(
            {"setup": setup, "round": i // 2, "rps": rps, "other_cores": taken, "steal_cores": 0.0}
        )
    return out


def test_ratios_are_taken_within_each_round_and_marked_when_contended() -> None:
    rows = _rounds(("echo", 4000, 0), ("w1", 3200, 0), ("echo", 2000, 0), ("w1", 1000, 0.5))
    assert h2.round_ratios(rows, "w1", "echo") == [(0.8, False), (0.5, True)]


def test_two_workers_accounted_for_h2load_are_taken_within_each_round() -> None:
    """2 x (req/s per server core) over 1 x, per round: runs seconds apart, as every ratio
    the harness judges (each setup's best runs are minutes apart)."""
    rows = [
        {"setup": "w1", "round": 0, "rps": 7000, "server_cores": 1.4, "other_cores": 0.0},
        {"setup": "w2", "round": 0, "rps": 8000, "server_cores": 2.0, "other_cores": 0.0},
        {"setup": "w1", "round": 1, "rps": 6000, "server_cores": 1.5, "other_cores": 0.0},
        {"setup": "w2", "round": 1, "rps": 8000, "server_cores": 1.6, "other_cores": 0.4},
    ]
    for r in rows:
        r["steal_cores"] = 0.0
    ratios = h2.round_ratios(rows, "w2", "w1", h2.per_server_core)
    assert ratios == [(pytest.approx(0.8), False), (pytest.approx(1.25), True)]
    assert h2.per_server_core({"rps": 100, "server_cores": 0.0}) == 0.0


@pytest.mark.parametrize(
    ("ratios", "median"),
    [
        ([(0.9, False)], None),
        ([(0.9, False), (0.7, True), (0.8, False)], None),
        ([(0.9, False), (0.7, False), (0.8, False)], 0.8),
        ([(0.9, False), (0.1, True), (0.7, False), (0.8, False), (0.75, False)], 0.775),
        ([(0.5, True)] * 5, None),
    ],
)
def test_a_bar_needs_three_calm_rounds(ratios: list[tuple[float, bool]], median: float) -> None:
    assert h2.MIN_CALM_ROUNDS == 3
    assert h2.calm_median(ratios) == median


def test_a_durable_batch_run_says_when_blocks_reached_their_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The warning as the write-behind logs it past `max_unexpanded_assignments`.
    store = SimpleNamespace(get_latest_assignments=None, get_assignments_by_ids=None)
    journal = PostgresJournal(store, max_unexpanded_assignments=100)  # type: ignore[arg-type]
    journal.stats.unexpanded_assignments = 90
    with caplog.at_level(logging.WARNING, logger="allocsvc.store.writebehind"):
        assert not journal._as_block(20_000)
    target = SimpleNamespace(setup=SimpleNamespace(name="w1"), workdir=tmp_path)
    (tmp_path / "w1-0.log").write_text('{"msg": "serving"}\n')
    (tmp_path / "w2-0.log").write_text(caplog.text)  # another setup's
    assert not h2.past_block_bound(target)
    (tmp_path / "w1-1.log").write_text(caplog.text)
    assert h2.past_block_bound(target)


def test_each_round_starts_one_setup_further_on() -> None:
    setups = ["echo", "bare", "constant", "untraced", "allocsvc"]
    assert h2.rotated(setups, 1) == ["bare", "constant", "untraced", "allocsvc", "echo"]
    assert h2.rotated(setups, 5) == setups
    assert h2.rotated(tuple(setups), 0) == setups


def test_durable_setups_get_the_raised_block_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # As the servers read the environment the harness gives them (a misspelt variable would
    # leave them at the default and the batch row at the bound again).
    env = h2.run.server_env("uvloop", 0.0, h2.BENCH_MAX_UNEXPANDED)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.backpressure.max_unexpanded_assignments == h2.BENCH_MAX_UNEXPANDED
    assert h2.BENCH_MAX_UNEXPANDED > h2.DEFAULT_MAX_UNEXPANDED
    assert settings.max_connection_age == 0.0
    monkeypatch.delenv("ALLOCSVC_BACKPRESSURE__MAX_UNEXPANDED_ASSIGNMENTS")
    assert Settings().backpressure.max_unexpanded_assignments == h2.DEFAULT_MAX_UNEXPANDED
