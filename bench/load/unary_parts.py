"""What each part of a unary `Allocate` costs the server under load (issue 10): the gap to echo,
taken apart in one run.

    python bench/load/unary_parts.py [--rate 2000] [--rounds 3] [--seconds 10]

The unary bar asks for 80% of echo's calls/s. Measured in one process with hot caches, the
handler (telemetry wrapper, `AllocateBytes`, the Rust call) costs 5-7 µs a call, yet a call
costs allocsvc tens of microseconds more than echo. Here every setup runs at the same fixed
rate (h2load `--rps`, 16 connections x 1 stream), so what differs is the CPU a call takes, on
the server's main thread (the event loop, where its Python runs and what saturates) and in all:

- `echo`: bench/load/echo.py.
- `bare`: `allocsvc serve --in-memory` whose `Allocate` answers echo's pre-serialized
  response, with no telemetry wrapper: the process, its other handlers and tasks, and gRPC.
- `constant`: the same with the telemetry wrapper (request id, deadline check, metrics).
- `untraced`: the real `Allocate` without the telemetry wrapper.
- `allocsvc`: the real `Allocate` as served (h2.py's `mem`).

The parts come from bench/load/unary_parts_site/sitecustomize.py, on the servers' PYTHONPATH
(a measurement only). The setups run one after the other in each round, the order rotated each
round; the table has each round and the median over the calm rounds (other work and steal at
most h2.py's CONTENDED_CORES), and the parts as differences
of medians: `bare - echo` (allocsvc's process), `constant - bare` (telemetry), `allocsvc -
constant` (the handler: Python and Rust). Setups without the wrapper count no RPCs, so their
calls show as "answered but not counted" (not errors of theirs). Bounded: rounds x 5 runs of
`--seconds` each after 3 s of warm-up, one server at a time on 127.0.0.1. Prints a markdown
table; nothing is written to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import h2  # bench/load/h2.py

SITE = Path(__file__).resolve().parent / "unary_parts_site"
# (setup, h2.py's server, ALLOCSVC_BENCH_PART)
SETUPS = (
    ("echo", "echo", ""),
    ("bare", "mem", "bare"),
    ("constant", "mem", "constant"),
    ("untraced", "mem", "untraced"),
    ("allocsvc", "mem", ""),
)
# (part, setup, the setup it is measured against)
PARTS = (
    ("allocsvc's process (bare - echo)", "bare", "echo"),
    ("telemetry wrapper (constant - bare)", "constant", "bare"),
    ("handler: Python and Rust (allocsvc - constant)", "allocsvc", "constant"),
    ("telemetry wrapper, real handler (allocsvc - untraced)", "allocsvc", "untraced"),
    ("all (allocsvc - echo)", "allocsvc", "echo"),
)
WARMUP_S = 3.0


def medians(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """The median of `key` over each setup's calm rows (all of its rows if none was calm)."""
    by_setup: dict[str, list[float]] = {}
    for row in rows:
        by_setup.setdefault(row["setup"], [])
        if not row["contended"]:
            by_setup[row["setup"]].append(row[key])
    for name, values in by_setup.items():
        if not values:
            values.extend(r[key] for r in rows if r["setup"] == name)
    return {name: statistics.median(values) for name, values in by_setup.items()}


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Fixed rate {args.rate:,} calls/s, 16 connections x 1 stream, {args.seconds:g} s a run, "
        f"{args.rounds} rounds. µs of CPU per call: main thread / whole server.",
        "",
        "| round | setup | calls/s | main thread µs/call | server µs/call | other + steal cores "
        "| detail |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['setup']} | {r['rps']:,.0f} | {r['loop_us']:,.0f} "
            f"| {r['cpu_us']:,.0f} | {r['taken']:.2f}{' (contended)' if r['contended'] else ''} "
            f"| {r['detail']} |"
        )
    loop, cpu = medians(rows, "loop_us"), medians(rows, "cpu_us")
    lines += ["", "| part | main thread µs/call | server µs/call |", "|---|---:|---:|"]
    for name, setup, base in PARTS:
        lines.append(
            f"| {name} | {loop[setup] - loop[base]:+,.0f} | {cpu[setup] - cpu[base]:+,.0f} |"
        )
    medians_text = ", ".join(f"{s} {loop[s]:,.0f} / {cpu[s]:,.0f}" for s, _, _ in SETUPS)
    lines += [
        "",
        f"Medians over the calm runs (other work and steal at most {h2.CONTENDED_CORES} cores; "
        f"main thread / server µs per call): {medians_text}.",
    ]
    return "\n".join(lines)


def use_site() -> None:
    """Put SITE first on the PYTHONPATH of the servers started from here on (they take their
    part from ALLOCSVC_BENCH_PART)."""
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{SITE}{os.pathsep}{path}" if path else str(SITE)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=2000, help="calls/s, every setup")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="each measured run")
    args = parser.parse_args()
    use_site()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="allocsvc-unary-parts-") as tmp:
        workdir = Path(tmp)
        h2load = h2.find_h2load()
        body, _ = h2.unary_body(workdir, h2.run.BATCH_EXPERIMENT)
        shape = h2.Shape(16, 1, rate=args.rate)
        for round_ in range(1, args.rounds + 1):
            for setup, server, part in h2.rotated(SETUPS, round_ - 1):
                os.environ["ALLOCSVC_BENCH_PART"] = part
                target = h2.start(server, workdir, None)
                try:
                    h2.run_h2load(h2load, target, body, shape, WARMUP_S)
                    row = h2.run_h2load(h2load, target, body, shape, args.seconds)
                finally:
                    target.setup.stop()
                rows.append(
                    {
                        "round": round_,
                        "setup": setup,
                        "rps": row["rps"],
                        "loop_us": row["loop_us_per_request"],
                        "cpu_us": row["cpu_us_per_request"],
                        "taken": h2._taken(row),
                        "contended": h2._contended(row),
                        "detail": row["detail"],
                    }
                )
                print(f"round {round_} {setup}: done", file=sys.stderr, flush=True)
    print(table(rows, args))


if __name__ == "__main__":
    main()
