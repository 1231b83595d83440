"""Durable `RecordConversion` of users memory holds and of users it evicted (issue 10).

    python bench/load/conversions.py [--seconds 8] [--users 30000] [--batch-seconds 25]
        [--after 30] [--rounds 1] [--base REV]

`bench/load/run.py`'s durable `RecordConversion` rows convert users allocated before its batch
runs, which by then have pushed them out of memory (`max_held_assignments`): each conversion
looks its user up in PostgreSQL, in the blocks the batches were written as. This measures that
path alone, on one `allocsvc serve --workers 1` with the embedded PostgreSQL, with ghz as
run.py drives it (c=32, each call a new idempotency key for one of `--users` users allocated
first): conversions while the users are held; `AllocateBatch` of 1,000 new users (non-sticky)
for `--batch-seconds`, enough to evict them (ghz at c=4, about 130,000 allocations/s here);
conversions right after (the block expander then takes PostgreSQL too), and again after
`--after` seconds. With `--base`, the same on that commit's build (ab.py's worktree), the two
alternating, each round on new databases. Bounded: about 70 s plus `--batch-seconds` and
`--after` per setup and round. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

import ab  # bench/load/ab.py
import run  # bench/load/run.py

PHASES = ("held", "evicted", "later")


def _row(name: str, k: int, phase: str, r: dict[str, Any]) -> str:
    return (
        f"| {k} | {name} | {phase} | {r['rps']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} "
        f"| {run._errors(r)} | {r['cpu_us_per_request']:,.0f} | {r['server_cores']:.2f} |"
    )


def measure(args: argparse.Namespace, name: str, k: int, work: Path, postgres: Any) -> list[str]:
    setup = run.start_allocsvc(name, work, run.database(postgres, f"conv_{name}_{k}"))
    try:
        run._create_experiments(setup)
        run._wait_known(setup)
        run._preallocate(setup, args.users)
        conversions = run.Shape("conversion", 32)
        rows = []

        def convert(phase: str) -> None:
            run.run_ghz(args.ghz, setup, conversions, 2, f"{name}{k}-{phase}-w", args.users)
            r = run.run_ghz(
                args.ghz, setup, conversions, args.seconds, f"{name}{k}-{phase}", args.users
            )
            rows.append(_row(name, k, phase, r))
            print(rows[-1], file=sys.stderr)

        convert("held")
        batches = run.Shape("batch", 4, 1000)
        r = run.run_ghz(args.ghz, setup, batches, args.batch_seconds, f"{name}{k}-b")
        print(f"{name}: {r['items_per_s']:,.0f} allocations/s of batches", file=sys.stderr)
        convert("evicted")
        time.sleep(args.after)
        convert("later")
        return rows
    finally:
        setup.stop()


def main() -> int:
    signal.signal(signal.SIGTERM, run._exit_on_sigterm)  # stop the servers and PostgreSQL
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per phase")
    parser.add_argument("--users", type=int, default=30_000, help="users allocated first")
    parser.add_argument("--batch-seconds", type=float, default=25.0)
    parser.add_argument("--after", type=float, default=30.0, help="seconds before 'later'")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--base", help="also measure this commit, alternating with this tree")
    args = parser.parse_args()
    args.ghz = run.find_ghz()
    lines = [
        ab.heading(),
        "",
        "| round | setup | phase | conversions/s | p50 ms | p99 ms | errors "
        "| server CPU µs/call | server cores |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    stores = ab.stores_and_base("allocsvc-conversions-", args.base, parser)
    with stores as (work, postgres, _redis, base_src):
        for k, name in ab.turns(base_src, args.rounds):
            lines += measure(args, name, k, work, postgres)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
