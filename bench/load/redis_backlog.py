"""A replica sharing Redis after a burst of batches: resident memory, Redis health, records
waiting to be pushed (issue 10).

    python bench/load/redis_backlog.py [--batch-seconds 16] [--after 30] [--base REV]

One `allocsvc serve --redis-url ...` (the embedded PostgreSQL, a redis-server) takes
`AllocateBatch` of 1,000 new users (non-sticky) from ghz at c=4 for `--batch-seconds`; each
new assignment's record for lookups by id is pushed to Redis behind the calls. Then, with no
traffic, every 5 s for `--after` seconds: the server's RSS, `allocsvc_store_up{store="redis"}`
and `allocsvc_redis_pending_records` (when that commit has it) from its metrics. With `--base`,
the same on that commit's build (ab.py's worktree) first. Bounded: about 20 s plus
`--batch-seconds` and `--after` per setup. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import ab  # bench/load/ab.py
import run  # bench/load/run.py

METRICS_PORT = 19_317


def _metrics(port: int) -> dict[str, str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))


def measure(
    args: argparse.Namespace, name: str, work: Path, postgres: Any, redis: str
) -> list[str]:
    port = METRICS_PORT + (name == "base")
    dsn = run.database(postgres, f"backlog_{name}")
    # A Redis database of its own (run.stores gives database 0).
    redis = redis.removesuffix("/0") + ("/1" if name == "base" else "/0")
    setup = run.start_allocsvc(name, work, dsn, redis=redis, metrics_port=port)
    rows = []

    def sample(when: str, allocations: str = "") -> None:
        m = _metrics(port)
        up = m.get('allocsvc_store_up{store="redis"}', "?")
        pending = m.get("allocsvc_redis_pending_records", "-")
        rss = run._rss_kib(setup.pids()) / 1024
        rows.append(
            f"| {name} | {when} | {allocations} | {rss:,.0f} | {float(up):.0f} "
            f"| {pending if pending == '-' else f'{float(pending):,.0f}'} |"
        )
        print(rows[-1], file=sys.stderr)

    try:
        run._create_experiments(setup)
        run._wait_known(setup)
        sample("before")
        r = run.run_ghz(args.ghz, setup, run.Shape("batch", 4, 1000), args.batch_seconds, name)
        sample("after the batches", f"{r['count'] * 1000:,} ({r['items_per_s']:,.0f}/s)")
        for waited in range(5, int(args.after) + 1, 5):
            time.sleep(5)
            sample(f"+{waited} s")
        return rows
    finally:
        setup.stop()


def main() -> int:
    signal.signal(signal.SIGTERM, run._exit_on_sigterm)  # stop the servers and the stores
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batch-seconds", type=float, default=16.0)
    parser.add_argument("--after", type=float, default=30.0, help="seconds sampled after")
    parser.add_argument("--base", help="also measure this commit, before this tree")
    args = parser.parse_args()
    args.ghz = run.find_ghz()
    lines = [
        ab.heading(),
        "",
        "| setup | when | allocations (rate) | RSS MiB | Redis up | records pending |",
        "|---|---|---:|---:|---:|---:|",
    ]
    stores = ab.stores_and_base("allocsvc-backlog-", args.base, parser)
    with stores as (work, postgres, redis, base_src):
        for _, name in ab.turns(base_src, first="base"):
            lines += measure(args, name, work, postgres, redis)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
