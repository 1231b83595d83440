"""bench/load/backlog.py: the main thread's CPU a finished call, per 100 ms of a run, by the
window's mean latency and by the time since a pause ended."""

from __future__ import annotations

from bench_support import load_bench

backlog = load_bench("bench_load_backlog", "backlog.py")

W = backlog.WINDOW_NS
FREQUENCY = 100  # samples a second: one sample is 10 ms of CPU


def series(window: int, calls: int, latency_ms: float) -> str:
    """`calls` calls due in `window`, each finishing in the same window."""
    due = window * W
    latency = int(latency_ms * 1e6)
    return "".join(f"{due + i}\t{latency}\tOK\t0\n" for i in range(calls))


def samples(window: int, count: int, offset: float = 0.0) -> str:
    """`perf script -F tid,time` lines: `count` samples inside `window` (perf's clock)."""
    start = window * W / 1e9 - offset
    return "".join(f"  4242 {start + 0.001 * (i + 1):.6f}: \n" for i in range(count))


def test_windows_are_binned_by_their_mean_latency_and_priced_per_finished_call() -> None:
    run = backlog.Run()
    # A window 40 calls at 0.5 ms, 2 samples (20 ms): 500 µs a call; perf's clock 3 s behind.
    run.add_series(series(1000, 40, 0.5))
    run.add_samples(samples(1000, 2, offset=3.0), offset=3.0)
    # The next: 40 calls at 50 ms (finishing in it), 4 samples: 1,000 µs a call.
    run.add_series(series(1001, 40, 50.0))
    run.add_samples(samples(1001, 4, offset=3.0), offset=3.0)
    # Then one with too few calls for the rate (the run's edge), left out.
    run.add_series(series(1002, 2, 0.5))
    rows = backlog.by_latency("w1", 400.0, run, FREQUENCY)
    assert rows == [
        "| w1 | 400 | 0-1 ms | 1 | 40 | 0.5 | 500 |",
        "| w1 | 400 | 30 ms or more | 1 | 40 | 50.0 | 1000 |",
    ]


def test_windows_are_grouped_by_the_time_since_a_pause_ended() -> None:
    run = backlog.Run(resumed=[100])
    for window, calls in ((100, 60), (101, 50), (130, 40)):
        run.add_series(series(window, calls, 2.0))
        run.add_samples(samples(window, 3), offset=0.0)
    run.add_series(series(99, 40, 2.0))  # before any pause ended: in no group
    rows = backlog.by_pause("echo", 400.0, run, FREQUENCY)
    assert rows == [
        "| echo | 400 | 0.0-0.1 s | 1 | 60 | 2.0 | 500 |",
        "| echo | 400 | 0.1-0.2 s | 1 | 50 | 2.0 | 600 |",
        "| echo | 400 | 1.5 s or more (steady) | 1 | 40 | 2.0 | 750 |",
    ]


def test_windows_are_grouped_by_the_host_slowdown_of_the_main_threads_cpus() -> None:
    run = backlog.Run()
    # The probes: CPU 0 at its usual speed in both windows, CPU 1 half as slow again in 201.
    run.slowdown = {0: {200: 1.0, 201: 1.0, 202: 1.0}, 1: {200: 1.0, 201: 1.5}}
    for window in (200, 201, 202):
        run.add_series(series(window, 40, 2.0))
    # Window 200 on CPU 1 (1.0x); 201: 1 sample on CPU 0, 3 on CPU 1 (1.375x); 202 on CPU 1,
    # which the probe has no figure for: in no group.
    run.add_samples("".join(f"  4242 [001] {20.0 + 0.01 * i:.6f}: \n" for i in range(2)), 0.0)
    lines = [f"  4242 [00{cpu}] {20.1 + 0.01 * i:.6f}: \n" for i, cpu in enumerate((0, 1, 1, 1))]
    run.add_samples("".join(lines), 0.0)
    run.add_samples("  4242 [001] 20.250000: \n", 0.0)
    assert run.host_slowdown(201) == 1.375
    assert run.host_slowdown(202) is None
    assert backlog.by_host("w1", 400.0, run, FREQUENCY) == [
        "| w1 | 400 | 0.00-1.05x | 1 | 40 | 2.0 | 500 |",
        "| w1 | 400 | 1.30x or more | 1 | 40 | 2.0 | 1000 |",
    ]
