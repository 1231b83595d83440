"""A server's CPU a call against how many calls wait (issue 10: the tail at 70% of saturation).

    python bench/load/backlog.py [--setups echo,w1] [--rates 7700,5800] [--seconds 50]
        [--pause-ms 150 --pause-every 3] [--probe 0.05]

For each setup of h2.py (`echo`, `w1`, `mem`: one server process) at its rate: the server as
h2.py starts it, then bench/load/openloop for `--seconds` (8 connections, calls due evenly
spaced, after 2 s unmeasured) writing each call's due time and latency, while `perf record -a
-e cpu-clock` samples both cores at `--frequency` Hz (system-wide: sampling the one thread made
the kernel reprogram perf's timer at each of its context switches, which overloaded the
server). Then, per 100 ms of the run: the calls that finished in it (due time + latency), the
samples of the server's main thread (the event loop's; each 1 / `--frequency` s of its CPU)
and the mean latency of the calls due in it (by Little's law, the rate times it is how many
calls waited). Printed: per setup and range of that mean latency, the windows and the main
thread's CPU a finished call.

Windows of dearer calls may make the queue, or the queue may make calls dearer. With
`--pause-ms`, the server is stopped (SIGSTOP) that long every `--pause-every` seconds, a queue
made from outside, and the windows are also grouped by the time since the last pause ended:
while its queue drains, against windows 1.5 s or more after it.

With `--probe`, bench/load/hostprobe.py's probes run beside the server, one pinned to each CPU,
each working that share of it: per window, how much dearer than at its fastest the probe's
L1-bound unit ran on each CPU (hostprobe's ratio), weighted by the main thread's samples on that
CPU, says how slow the host made the CPUs the main thread ran on. The windows are also
grouped by that: if the server's calls cost more where the probe's work does, the cause is
below the server.

Needs `perf` (linux-tools) and the right to sample the whole machine. Bounded: one server at a
time on 127.0.0.1, about `--seconds` + 20 s each.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h2  # bench/load/h2.py
import hostprobe  # bench/load/hostprobe.py
import run  # bench/load/run.py

WARMUP_S = 2.0
WINDOW_NS = 100_000_000
# Ranges of a window's mean latency, ms.
BINS = ((0.0, 1.0), (1.0, 3.0), (3.0, 10.0), (10.0, 30.0), (30.0, float("inf")))
# Windows after a pause ended, by how many windows later; from this many on, steady.
STEADY_AFTER = 15
# Windows with fewer finished calls than this share of the rate's are left out (the run's
# edges, the pauses themselves).
MIN_SHARE = 0.25
# Ranges of the host's slowdown of the main thread's CPUs in a window (the probe's ratio).
SLOWDOWNS = ((0.0, 1.05), (1.05, 1.13), (1.13, 1.3), (1.3, float("inf")))
SAMPLE = re.compile(r"^\s*\d+\s+(?:\[(\d+)\]\s+)?([\d.]+):")
SETUPS = ("echo", "w1", "mem")


@dataclass
class Run:
    """One setup's run, per window of `WINDOW_NS`: latencies (ms) of the calls due in it,
    calls finished in it, the main thread's perf samples in it (and by CPU); the windows in
    which a pause ended; with probes, each CPU's slowdown by window."""

    latencies: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    finished: Counter[int] = field(default_factory=Counter)
    main: Counter[int] = field(default_factory=Counter)
    main_on: Counter[tuple[int, int]] = field(default_factory=Counter)
    resumed: list[int] = field(default_factory=list)
    slowdown: dict[int, dict[int, float]] = field(default_factory=dict)

    def add_series(self, text: str) -> None:
        """openloop's `-series` lines: due time (Unix ns), latency (ns), result, send lag."""
        for line in text.splitlines():
            due, latency = (int(x) for x in line.split("\t")[:2])
            self.latencies[due // WINDOW_NS].append(latency / 1e6)
            self.finished[(due + latency) // WINDOW_NS] += 1

    def add_samples(self, script: str, offset: float) -> None:
        """`perf script -F tid,cpu,time` (or `tid,time`) lines of the main thread; `offset`:
        the wall clock minus perf's clock."""
        for line in script.splitlines():
            m = SAMPLE.match(line)
            if m:
                window = int((float(m[2]) + offset) * 1e9) // WINDOW_NS
                self.main[window] += 1
                if m[1] is not None:
                    self.main_on[window, int(m[1])] += 1

    def host_slowdown(self, window: int) -> float | None:
        """The probes' slowdown of the CPUs the main thread ran on in `window`, weighted by its
        samples on each; None without samples or probe figures for it."""
        weights = {cpu: self.main_on[window, cpu] for cpu in self.slowdown}
        if not sum(weights.values()) or any(
            window not in self.slowdown[cpu] for cpu, n in weights.items() if n
        ):
            return None
        total = sum(n * self.slowdown[cpu][window] for cpu, n in weights.items() if n)
        return total / sum(weights.values())

    def windows(self, rate: float) -> list[int]:
        floor = MIN_SHARE * rate * WINDOW_NS / 1e9
        return sorted(w for w in self.latencies if self.finished[w] >= floor)

    def row(self, windows: list[int], frequency: int) -> str:
        """The table's last four columns over `windows`."""
        calls = sum(self.finished[w] for w in windows)
        cpu = sum(self.main[w] for w in windows) / frequency
        latency = statistics.mean(statistics.mean(self.latencies[w]) for w in windows)
        return (
            f"{len(windows)} | {calls / len(windows):.0f} | {latency:.1f} | "
            f"{cpu / calls * 1e6:.0f} |"
        )


def pauses(pid: int, args: argparse.Namespace, stop: threading.Event, resumed: list[float]) -> None:
    """Stop and continue process `pid` as `--pause-ms` and `--pause-every` say, until `stop`;
    each end of a pause (wall clock) into `resumed`."""
    while not stop.wait(args.pause_every):
        os.kill(pid, signal.SIGSTOP)
        time.sleep(args.pause_ms / 1000)
        os.kill(pid, signal.SIGCONT)
        resumed.append(time.time())


def measure(
    setup: str,
    rate: float,
    args: argparse.Namespace,
    work: Path,
    postgres: object,
    openloop: Path,
    message: Path,
) -> Run:
    target = h2.start(setup, work, postgres, database=f"backlog_{setup}")
    series, samples = work / f"{setup}.tsv", work / f"{setup}.perf"
    pid = target.setup.processes[0].pid
    command = h2.openloop_command(
        openloop,
        target.setup.target,
        message,
        rate,
        h2.STEADY_CONNECTIONS,
        args.seconds,
        WARMUP_S,
        series=series,
    )
    # perf's clock (CLOCK_MONOTONIC) to the series' (the wall clock).
    offset = time.time() - time.monotonic()
    record = ["perf", "record", "-q", "-a", "-e", "cpu-clock", "-F", str(args.frequency)]
    record += ["-k", "CLOCK_MONOTONIC", "-o", str(samples), "--"]
    span = args.seconds + WARMUP_S + 2
    perf = subprocess.Popen([*record, "sleep", str(span)])
    cpus = sorted(os.sched_getaffinity(0)) if args.probe > 0 else []
    probing = [
        hostprobe.start(work / f"{setup}-probe-{cpu}.tsv", span, args.probe, cpu) for cpu in cpus
    ]
    stop, resumed = threading.Event(), list[float]()
    pauser = threading.Thread(target=pauses, args=(pid, args, stop, resumed))
    if args.pause_ms > 0:
        pauser.start()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.seconds + 120)
        if done.returncode != 0:
            raise RuntimeError(f"openloop failed:\n{done.stderr[-2000:]}")
    finally:
        stop.set()
        if pauser.is_alive():
            pauser.join()
        os.kill(pid, signal.SIGCONT)
        perf.wait(timeout=args.seconds + 60)
        for process in probing:
            process.wait(timeout=args.seconds + 60)
        target.setup.stop()
    result = Run(resumed=[int(t * 1e9) // WINDOW_NS for t in resumed])
    result.add_series(series.read_text())
    for cpu, process in zip(cpus, probing, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"the probe on CPU {cpu} failed")
        units = (work / f"{setup}-probe-{cpu}.tsv").read_text()
        result.slowdown[cpu] = hostprobe.relative(hostprobe.medians(units)["loop"])
    script = subprocess.run(
        ["perf", "script", "-i", str(samples), "-F", "tid,cpu,time", "--tid", str(pid)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result.add_samples(script, offset)
    return result


def in_ranges(
    setup: str,
    rate: float,
    result: Run,
    frequency: int,
    ranges: tuple[tuple[float, float], ...],
    value: Callable[[int], float | None],
    span: Callable[[float, float], str],
) -> list[str]:
    """The table's rows: `result`'s windows grouped by `value` of each (None: in no group) into
    `ranges` (low inclusive, high not), each range labelled `span(low, high)`."""
    values = {w: value(w) for w in result.windows(rate)}
    rows = []
    for low, high in ranges:
        these = [w for w, v in values.items() if v is not None and low <= v < high]
        if these:
            label = span(low, high)
            rows.append(f"| {setup} | {rate:,.0f} | {label} | " + result.row(these, frequency))
    return rows


def by_latency(setup: str, rate: float, result: Run, frequency: int) -> list[str]:
    def span(low: float, high: float) -> str:
        return f"{low:g}-{high:g} ms" if high != float("inf") else f"{low:g} ms or more"

    def latency(w: int) -> float:
        return statistics.mean(result.latencies[w])

    return in_ranges(setup, rate, result, frequency, BINS, latency, span)


def by_pause(setup: str, rate: float, result: Run, frequency: int) -> list[str]:
    groups: dict[int, list[int]] = defaultdict(list)
    for w in result.windows(rate):
        before = [r for r in result.resumed if r <= w]
        if before:
            groups[min(w - before[-1], STEADY_AFTER)].append(w)
    rows = []
    for after, windows in sorted(groups.items()):
        label = (
            f"{after * WINDOW_NS / 1e9:.1f}-{(after + 1) * WINDOW_NS / 1e9:.1f} s"
            if after < STEADY_AFTER
            else f"{STEADY_AFTER * WINDOW_NS / 1e9:.1f} s or more (steady)"
        )
        rows.append(f"| {setup} | {rate:,.0f} | {label} | " + result.row(windows, frequency))
    return rows


def by_host(setup: str, rate: float, result: Run, frequency: int) -> list[str]:
    def span(low: float, high: float) -> str:
        return f"{low:.2f}-{high:.2f}x" if high != float("inf") else f"{low:.2f}x or more"

    return in_ranges(setup, rate, result, frequency, SLOWDOWNS, result.host_slowdown, span)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--setups", default="echo,w1", help="h2.py's setups: echo, w1, mem")
    parser.add_argument("--rates", default="7700,5800", help="calls/s, one per setup")
    parser.add_argument("--seconds", type=float, default=50.0, help="measured seconds each")
    parser.add_argument("--frequency", type=int, default=499, help="perf's samples/s a core")
    parser.add_argument("--pause-ms", type=float, default=0.0, help="stop the server this long")
    parser.add_argument("--pause-every", type=float, default=3.0, help="seconds between pauses")
    parser.add_argument(
        "--probe", type=float, default=0.0, help="hostprobe.py beside it, this share of each CPU"
    )
    args = parser.parse_args()
    setups, rates = args.setups.split(","), [float(r) for r in args.rates.split(",")]
    if len(setups) != len(rates):
        raise SystemExit("--rates: one rate per setup")
    if set(setups) - set(SETUPS):
        raise SystemExit(f"--setups: of {', '.join(SETUPS)} (one server process each)")
    if not 0 <= args.probe <= 1:
        raise SystemExit("--probe: a share of a CPU, 0 to 1")
    if shutil.which("perf") is None:
        raise SystemExit("perf not found (linux-tools)")
    columns = "| windows of 100 ms | calls finished a window | mean latency, ms "
    columns += "| main thread µs a call |\n|---|---:|---|---:|---:|---:|---:|"
    results = []
    with tempfile.TemporaryDirectory(prefix="backlog-") as tmp:
        work = Path(tmp)
        openloop = h2.build_openloop(work)
        _, message, _ = h2.grpc_body(work)
        with run.stores(work) as (postgres, _):
            for setup, rate in zip(setups, rates, strict=True):
                result = measure(setup, rate, args, work, postgres, openloop, message)
                results.append((setup, rate, result))
    print("| setup | calls/s | the window's mean latency " + columns)
    for setup, rate, result in results:
        print("\n".join(by_latency(setup, rate, result, args.frequency)))
    if args.pause_ms > 0:
        print(f"\n| setup | calls/s | since a {args.pause_ms:g}-ms pause ended " + columns)
        for setup, rate, result in results:
            print("\n".join(by_pause(setup, rate, result, args.frequency)))
    if args.probe > 0:
        print("\n| setup | calls/s | the host's slowdown of the main thread's CPUs " + columns)
        for setup, rate, result in results:
            print("\n".join(by_host(setup, rate, result, args.frequency)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
