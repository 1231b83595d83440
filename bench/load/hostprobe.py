"""How much CPU fixed work takes on this machine, per 100 ms (issue 10: is the host behind the
spells in which every call of a server costs more?).

    python bench/load/hostprobe.py [--seconds 60] [--duty 0.1] [--cpus 0,1]

On each of `--cpus` (by default every CPU the process may use) a probe process (pinned to it) runs
two fixed units of Python work in turn, each timed by its thread's CPU clock (a wait for a core does
not count): `loop`, dict updates on a few keys (a working set in L1), and `walk`, reading tuples at
random out of about 20 MiB of them (past a core's L2, into the L3 the host shares). It works
`--duty` of the time: after a pair of units it sleeps so long as they took, times (1 / duty - 1).
Per 100 ms window, each kind's median CPU a unit, over the run's fastest: the first decile of those
medians (the CPU at full speed; the run's median would hide a run slowed throughout, as at 17:13 UTC
on 11-26, when `loop` took 532 µs a unit against 324-356 in the hour before). Printed per CPU and
kind: that fastest, the windows' ratios to it (percentiles), the windows `SPELL_RATIO` or more above
it, and how many windows in a row those come (spells); then how many windows were dear on every CPU
at once.

Item 78 of bench/RESULTS.md saw one worker's calls cost 13-30% more CPU for 0.1-0.4 s at a time,
echo's too, for no cause inside the server. If the machine alone, nothing of ours running, does
the same to this work, the cause is below us. `backlog.py --probe` runs the probes beside a
server, to see whether the probes' dear windows are the server's.

Bounded: a process a CPU, `--seconds` long, at `--duty` of it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

WINDOW_NS = 100_000_000
KINDS = ("loop", "walk")
# A window whose median is this many times the run's fastest is a dear one (item 78's lower
# bound).
SPELL_RATIO = 1.13
LOOP_ITERATIONS = 4_000
WALK_TUPLES = 300_000
WALK_READS = 1_000


def loop_unit() -> int:
    counts: dict[int, int] = {}
    for i in range(LOOP_ITERATIONS):
        counts[i & 63] = counts.get(i & 63, 0) + i
    return len(counts)


def probe(out: Path, seconds: float, duty: float, cpu: int | None = None) -> None:
    """Run the units for `seconds` (on CPU `cpu` alone, if given), writing a line a unit: wall
    clock ns, kind, CPU ns."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    tuples = [(i,) for i in range(WALK_TUPLES)]
    order = list(range(WALK_TUPLES))
    random.Random(7).shuffle(order)
    start = 0
    lines: list[str] = []
    end = time.time() + seconds
    while time.time() < end:
        began = time.thread_time_ns()
        loop_unit()
        walked = time.thread_time_ns()
        total = 0
        for i in order[start : start + WALK_READS]:
            total += tuples[i][0]
        done = time.thread_time_ns()
        start = (start + WALK_READS) % (WALK_TUPLES - WALK_READS)
        now = time.time_ns()
        lines.append(f"{now}\tloop\t{walked - began}\n{now}\twalk\t{done - walked}\n")
        time.sleep((done - began) / 1e9 * (1 / duty - 1))
    out.write_text("".join(lines))


def start(out: Path, seconds: float, duty: float, cpu: int) -> subprocess.Popen[bytes]:
    """A probe on CPU `cpu`, in a process of its own; its lines are in `out` once it ends."""
    command = [sys.executable, __file__, "--child", str(out), "--cpus", str(cpu)]
    return subprocess.Popen([*command, "--seconds", str(seconds), "--duty", str(duty)])


def probes(work: Path, seconds: float, duty: float, cpus: list[int]) -> dict[int, Path]:
    """A probe on each of `cpus` for `seconds`, started together; each CPU's lines."""
    outs = {cpu: work / f"probe-{cpu}.tsv" for cpu in cpus}
    running = [start(out, seconds, duty, cpu) for cpu, out in outs.items()]
    for process in running:
        if process.wait(timeout=seconds + 60) != 0:
            raise RuntimeError(f"the probe on a CPU of {cpus} failed")
    return outs


def medians(text: str) -> dict[str, dict[int, float]]:
    """Per kind and window (wall clock ns // WINDOW_NS): the median CPU ns of its units."""
    units: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for line in text.splitlines():
        wall, kind, cpu = line.split("\t")
        units[kind][int(wall) // WINDOW_NS].append(int(cpu))
    return {
        kind: {w: statistics.median(v) for w, v in windows.items()}
        for kind, windows in units.items()
    }


def fastest(windows: dict[int, float]) -> float:
    """The first decile of the windows' medians: the CPU at full speed in the run."""
    return sorted(windows.values())[len(windows) // 10]


def relative(windows: dict[int, float]) -> dict[int, float]:
    """Each window's median over the run's fastest."""
    base = fastest(windows)
    return {w: m / base for w, m in windows.items()}


def spells(ratios: dict[int, float], threshold: float = SPELL_RATIO) -> Counter[int]:
    """How many runs of consecutive windows at `threshold` or more there are, by length."""
    lengths: Counter[int] = Counter()
    run, last = 0, None
    for w in sorted(ratios):
        if ratios[w] >= threshold and (run == 0 or w == last):
            run += 1
        elif ratios[w] >= threshold:
            lengths[run] += 1
            run = 1
        elif run:
            lengths[run] += 1
            run = 0
        last = w + 1
    if run:
        lengths[run] += 1
    return lengths


@dataclass(frozen=True)
class Summary:
    kind: str
    windows: int
    unit_us: float
    percentiles: tuple[float, ...]  # p50, p90, p99, max of the windows' ratios
    dear: int
    spells: Counter[int]

    def row(self) -> str:
        ratios = " / ".join(f"{p:.2f}" for p in self.percentiles)
        lengths = ", ".join(f"{n} x {length}" for length, n in sorted(self.spells.items()))
        return (
            f"| {self.kind} | {self.windows} | {self.unit_us:.0f} | {ratios} | "
            f"{self.dear} ({self.dear / self.windows:.1%}) | {lengths or '-'} |"
        )


def summarize(kind: str, windows: dict[int, float]) -> Summary:
    ratios = relative(windows)
    ordered = sorted(ratios.values())
    # (quantiles needs two windows; one is every percentile of itself)
    cuts = (
        statistics.quantiles(ordered, n=100, method="inclusive")
        if len(ordered) > 1
        else ordered * 99
    )
    return Summary(
        kind=kind,
        windows=len(ordered),
        unit_us=fastest(windows) / 1000,
        percentiles=(cuts[49], cuts[89], cuts[98], ordered[-1]),
        dear=sum(r >= SPELL_RATIO for r in ordered),
        spells=spells(ratios),
    )


HEADER = (
    "| unit | windows of 100 ms | fastest: µs a unit | window / fastest: p50 / p90 / p99 / max "
    f"| windows {SPELL_RATIO:g}x or more | their spells (count x windows) |\n"
    "|---|---:|---:|---|---:|---|"
)


def host_state(work: Path, seconds: float, duty: float) -> dict[int, tuple[float, float]]:
    """Probes on every CPU for `seconds`: per CPU, the share of windows in which `loop` ran
    `SPELL_RATIO` or more times its fastest, and its fastest in µs a unit (h2.py says both
    before and after its runs)."""
    cpus = sorted(os.sched_getaffinity(0))
    outs = probes(work, seconds, duty, cpus)
    state = {}
    for cpu, out in outs.items():
        loop = summarize("loop", medians(out.read_text())["loop"])
        state[cpu] = (loop.dear / loop.windows, loop.unit_us)
    return state


def together(dear: list[set[int]], windows: set[int]) -> tuple[int, float]:
    """Windows dear on every CPU at once, and how many that would be were the CPUs independent."""
    both = len(windows.intersection(*dear))
    expected = float(len(windows))
    for these in dear:
        expected *= len(these & windows) / len(windows)
    return both, expected


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--duty", type=float, default=0.1, help="share of a CPU each works")
    parser.add_argument("--cpus", help="a probe on each of these CPUs (default: all it may use)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 < args.duty <= 1:
        raise SystemExit("--duty: more than 0, at most 1")
    cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else sorted(os.sched_getaffinity(0))
    if args.child is not None:
        probe(args.child, args.seconds, args.duty, cpus[0])
        return 0
    with tempfile.TemporaryDirectory(prefix="hostprobe-") as tmp:
        outs = probes(Path(tmp), args.seconds, args.duty, cpus)
        per_cpu = {cpu: medians(out.read_text()) for cpu, out in outs.items()}
    print("| CPU " + HEADER.replace("\n|", "\n|---|", 1))
    for cpu, per_kind in per_cpu.items():
        for kind in KINDS:
            print(f"| {cpu} " + summarize(kind, per_kind[kind]).row())
    for kind in KINDS:
        ratios = [relative(per_kind[kind]) for per_kind in per_cpu.values()]
        windows = set.intersection(*(set(r) for r in ratios))
        dear = [{w for w, r in these.items() if r >= SPELL_RATIO} for these in ratios]
        both, expected = together(dear, windows)
        print(
            f"\n{kind}: {both} of {len(windows)} windows dear on every CPU at once "
            f"({expected:.1f} if the CPUs were independent)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
