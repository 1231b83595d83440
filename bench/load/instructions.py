"""Instructions a unary `Allocate` costs each server, counted under callgrind (issue 10): a
figure the host's drift does not move, where rates and CPU per call measured under load move
10-20% between runs minutes apart.

    python bench/load/instructions.py [--calls 2000] [--setups echo,bare,constant,untraced,allocsvc]
                                      [--metrics]

The setups are unary_parts.py's: `echo` (bench/load/echo.py) and `allocsvc serve --in-memory`
with parts taken out by bench/load/unary_parts_site (`bare`: echo's answer, no telemetry
wrapper; `constant`: the same with the wrapper; `untraced`: the real handler without it;
`allocsvc`: as served, h2.py's `mem`). allocsvc serves no metrics unless `--metrics` is given
(then each of its setups serves them, as h2.py's servers and production do, and counts every
call into them). Each runs under `valgrind --tool=callgrind` with
instrumentation off while it starts and while h2load sends it WARMUP_CALLS calls; then
instrumentation is switched on (`callgrind_control`) for `--calls` more calls (CONNECTIONS
connections x 1 stream) and the counts are dumped by thread. A table gives user-space
instructions per call on the main thread (the event loop, where the Python runs, and what
saturates under load) and in all the server's threads, and each setup's ratio to echo's
main thread.

What it counts: instructions executed in user space, the same in every run of the same code
(a few parts in a thousand apart). What it does not: the kernel (system calls, wake-ups),
cache misses, mispredicted branches, so a ratio of instructions is not a ratio of rates: under
load on this VM, allocsvc's extra instructions cost its main thread about twice what echo's
cost (bench/RESULTS.md, item 49). Setups with PostgreSQL are left out: valgrind runs a process
tens of times slower, so work done per unit of time (the write-behind's flush every 100 ms)
would count as per call many times over.

Bounded: one server at a time on 127.0.0.1, each start within START_S, WARMUP_CALLS +
`--calls` calls. Installs valgrind with apt-get when missing. Prints a markdown table; nothing
is written to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import benchkit  # bench/load/benchkit.py
import h2  # bench/load/h2.py
import run  # bench/load/run.py
import unary_parts  # bench/load/unary_parts.py

WARMUP_CALLS = 1000
CONNECTIONS = 4
START_S = 300.0  # a server starts several times slower under valgrind
# Smallest body of an answered call: a 5-byte gRPC frame header and a message of 40 bytes or
# more (an AllocateResponse names an assignment, experiment, variant and region). A call that
# failed has no body (its status is in the trailers, which h2load does not read).
MIN_ANSWER_BYTES = 45


@dataclass(frozen=True)
class Counted:
    """Instructions one setup's threads ran over `calls` calls: the main thread's and all."""

    setup: str
    calls: int
    main: int
    threads: int

    @property
    def main_per_call(self) -> float:
        return self.main / self.calls

    @property
    def threads_per_call(self) -> float:
        return self.threads / self.calls


def summaries(directory: Path, pid: int) -> dict[int, int]:
    """Instructions by thread number (1: the main thread) in the first dump of process `pid`
    (callgrind's `--separate-threads=yes` files `<prefix>.<pid>.1-<thread>`)."""
    out: dict[int, int] = {}
    for path in directory.glob(f"callgrind.out.{pid}.1-*"):
        thread = int(path.name.rsplit("-", 1)[1])
        found = re.search(r"^summary: (\d+)", path.read_text(), re.MULTILINE)
        if found is None:
            raise RuntimeError(f"{path}: no summary line")
        out[thread] = int(found.group(1))
    if 1 not in out:
        raise RuntimeError(f"no dump of process {pid}'s main thread in {directory}")
    return out


def answered(stdout: str, calls: int) -> None:
    """Raise unless h2load says every one of `calls` calls was answered with a body."""
    numbers = h2._parse(stdout)
    if numbers["succeeded"] != calls or numbers["non_2xx"]:
        raise RuntimeError(f"not every call succeeded:\n{stdout[-1500:]}")
    if numbers["data_bytes"] < calls * MIN_ANSWER_BYTES:
        raise RuntimeError(f"calls answered without a body (failed):\n{stdout[-1500:]}")


def errors_logged(log: Path) -> int:
    """Lines a server logged at level error (a handler that raised); 0 without a log."""
    if not log.exists():
        return 0
    return sum('"level": "error"' in line for line in log.read_text().splitlines())


def count(
    setup: str, server: str, part: str, calls: int, workdir: Path, metrics: bool = False
) -> Counted:
    valgrind, control = benchkit.debian_programs("valgrind", "valgrind", "callgrind_control")
    dumps = workdir / setup
    dumps.mkdir()
    wrap = [
        valgrind,
        "--tool=callgrind",
        "--instr-atstart=no",
        "--separate-threads=yes",
        f"--callgrind-out-file={dumps}/callgrind.out.%p",
    ]
    os.environ["ALLOCSVC_BENCH_PART"] = part
    if server == "echo":
        target = run.start_echo(workdir, wrap, START_S)
    else:
        target = run.start_allocsvc(
            setup,
            workdir,
            "",
            metrics_port=run._free_port() if metrics else None,
            connection_age=0.0,
            wrap=wrap,
            start_s=START_S,
        )
    try:
        if server != "echo":
            run._create_experiments(target)
        body, _ = h2.unary_body(workdir, run.BATCH_EXPERIMENT)
        h2load = h2.find_h2load()

        def send(n: int) -> None:
            command = h2.h2load_command(
                h2load, target.target, body, CONNECTIONS, 1, False, ["-n", str(n)]
            )
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"h2load against {setup} failed:\n{done.stderr[-1500:]}")
            answered(done.stdout, n)

        send(WARMUP_CALLS)
        pid = str(target.processes[0].pid)
        subprocess.run([control, "--zero", pid], check=True, capture_output=True, timeout=120)
        subprocess.run([control, "-i", "on", pid], check=True, capture_output=True, timeout=120)
        send(calls)
        subprocess.run([control, "--dump", pid], check=True, capture_output=True, timeout=600)
        by_thread = summaries(dumps, int(pid))
    finally:
        target.stop()
    log = workdir / f"{setup}-0.log"
    if errors_logged(log):
        raise RuntimeError(f"{setup} logged errors while counted:\n{log.read_text()[-1500:]}")
    return Counted(setup, calls, by_thread[1], sum(by_thread.values()))


def table(counted: list[Counted], calls: int, metrics: bool = False) -> str:
    base = next((c for c in counted if c.setup == "echo"), None)
    served = "allocsvc serving metrics" if metrics else "allocsvc without metrics"
    lines = [
        f"Instructions per unary call under callgrind (user space; {calls:,} calls after "
        f"{WARMUP_CALLS:,} uncounted, {CONNECTIONS} connections x 1 stream; {served}):",
        "",
        "| setup | main thread | all threads | echo's main thread over this setup's |",
        "|---|---:|---:|---:|",
    ]
    for c in counted:
        ratio = "-" if base is None or c is base else f"{base.main_per_call / c.main_per_call:.0%}"
        lines.append(
            f"| {c.setup} | {c.main_per_call:,.0f} | {c.threads_per_call:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="counted calls per setup")
    names = [s for s, _, _ in unary_parts.SETUPS]
    parser.add_argument(
        "--setups", default=",".join(names), help="comma-separated: " + ", ".join(names)
    )
    parser.add_argument(
        "--metrics", action="store_true", help="allocsvc serves Prometheus metrics (as h2.py's)"
    )
    args = parser.parse_args()
    chosen = args.setups.split(",")
    unknown = set(chosen) - set(names)
    if unknown:
        parser.error(f"unknown setups: {', '.join(sorted(unknown))}")
    unary_parts.use_site()
    counted = []
    with tempfile.TemporaryDirectory(prefix="allocsvc-instructions-") as tmp:
        for setup, server, part in unary_parts.SETUPS:
            if setup in chosen:
                counted.append(count(setup, server, part, args.calls, Path(tmp), args.metrics))
                print(f"{setup}: {counted[-1].main_per_call:,.0f} a call", file=sys.stderr)
    print(table(counted, args.calls, args.metrics))


if __name__ == "__main__":
    main()
