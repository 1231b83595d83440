"""bench/load/hostprobe.py: fixed work's CPU per 100 ms window, against the run's median."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

from bench_support import load_bench

hostprobe = load_bench("bench_load_hostprobe", "hostprobe.py")

W = hostprobe.WINDOW_NS


def test_units_are_taken_per_window_and_kind_as_medians() -> None:
    lines = [f"{5 * W + i}\tloop\t{cpu}" for i, cpu in enumerate((100, 300, 200))]
    lines += [f"{6 * W}\tloop\t400", f"{6 * W}\twalk\t900"]
    assert hostprobe.medians("\n".join(lines)) == {
        "loop": {5: 200, 6: 400},
        "walk": {6: 900},
    }


def test_windows_are_taken_over_the_runs_fastest_decile_not_its_median() -> None:
    # A run slowed throughout but for its first tenth: the median is a slow window.
    windows = {w: 150.0 for w in range(20)}
    windows.update({0: 90.0, 1: 100.0, 2: 100.0})
    assert hostprobe.fastest(windows) == 100.0
    ratios = hostprobe.relative(windows)
    assert ratios[0] == 0.9 and ratios[1] == 1.0 and ratios[5] == 1.5


def test_spells_are_counted_by_their_length_in_consecutive_windows() -> None:
    ratios = {1: 1.0, 2: 1.2, 3: 1.5, 4: 1.0, 5: 1.13, 7: 1.3, 8: 1.4, 9: 1.5}
    # 2-3 (two windows), 5 (one: 6 is missing, so 7 starts another), 7-9 (three, at the end).
    assert hostprobe.spells(ratios) == Counter({2: 1, 1: 1, 3: 1})
    assert hostprobe.spells({1: 1.0, 2: 1.1}) == Counter()


def test_a_summary_row_gives_percentiles_dear_windows_and_spells() -> None:
    windows = {w: 1000.0 for w in range(96)}
    windows.update({96: 1500.0, 97: 1500.0, 98: 1200.0, 99: 2000.0})
    summary = hostprobe.summarize("loop", windows)
    assert summary.windows == 100
    assert summary.unit_us == 1.0
    assert summary.percentiles[:2] == (1.0, 1.0)
    assert summary.percentiles[3] == 2.0
    assert summary.dear == 4
    assert summary.spells == Counter({4: 1})
    assert summary.row().endswith("| 4 (4.0%) | 1 x 4 |")
    # One window (a probe of a tenth of a second) is each of its percentiles.
    alone = hostprobe.summarize("loop", {3: 500.0})
    assert (alone.windows, alone.unit_us, alone.percentiles) == (1, 0.5, (1.0,) * 4)


def test_together_counts_windows_dear_on_every_cpu_against_independence() -> None:
    windows = set(range(10))
    both, expected = hostprobe.together([{1, 2, 3, 4, 5}, {4, 5, 6, 7, 8}], windows)
    assert (both, expected) == (2, 2.5)


def test_a_probe_writes_timed_units_of_both_kinds(tmp_path: Path) -> None:
    out = tmp_path / "units.tsv"
    hostprobe.probe(out, seconds=0.2, duty=1.0)
    per_kind = hostprobe.medians(out.read_text())
    assert set(per_kind) == set(hostprobe.KINDS)
    assert all(m > 0 for windows in per_kind.values() for m in windows.values())


def test_the_host_state_of_every_cpu_is_a_share_of_its_windows_and_a_speed(
    tmp_path: Path,
) -> None:
    state = hostprobe.host_state(tmp_path, seconds=0.3, duty=0.5)
    assert sorted(state) == sorted(os.sched_getaffinity(0))
    assert all(0.0 <= share <= 1.0 and us > 0 for share, us in state.values())
    assert {p.name for p in tmp_path.iterdir()} == {f"probe-{cpu}.tsv" for cpu in state}


def test_h2_says_what_the_probes_found_before_and_after_its_runs() -> None:
    h2 = load_bench("bench_load_h2", "h2.py")
    args = argparse.Namespace(host_probe=20.0)
    assert h2.host_line([], args) == ""
    before = {0: (0.073, 331.2), 1: (0.115, 336.0)}
    after = {0: (0.148, 329.0), 1: (0.1, 512.7)}
    line = h2.host_line([("before", before), ("after", after)], args)
    assert line == (
        " The host's CPUs (0 / 1), by `bench/load/hostprobe.py` for 20 s: the share of 100-ms "
        "windows in which fixed work took 1.13x its fastest or more (that fastest, µs a unit; "
        "bench/RESULTS.md item 79): before, 7% / 12% (331 / 336 µs); after, 15% / 10% "
        "(329 / 513 µs)."
    )
