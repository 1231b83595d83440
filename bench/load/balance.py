"""How two workers share a fixed rate of unary calls on a few connections, with and without
`max_connection_age` and steering (issue 10).

    python bench/load/balance.py [--ages 0,10] [--steer off] [--rounds 3] [--rate 3200]
        [--seconds 60] [--conns 8]

The kernel gives each connection to one worker (SO_REUSEPORT, a hash of its addresses) for as
long as it lives, so 8 connections may split 4 / 4 or 7 / 1. With a connection age, the server
has each client reconnect now and then (GOAWAY) and the next connection is drawn again; with
steering (`steer_connections`, allocsvc/steering.py) drawn with weights against the busier
worker. For each round and each pair of an age in `--ages` and a setting in `--steer` (`on`,
`off`; the pairs' order reversed each round): `allocsvc serve --workers 2` on the embedded
PostgreSQL (a database of its own) with that `max_connection_age` and steering, then
bench/load/openloop at `--rate` calls/s round robin over `--conns` connections for `--seconds`
(after 2 s unmeasured; h2.py's fixed-rate call, a non-sticky experiment), reconnecting after
each GOAWAY. Per run: the rate kept, errors (openloop's non-OK calls and the servers' non-OK
counts), p50 and p99 from each call's due time, the busier worker's share of the calls (from
each worker's `allocsvc_rpcs_total`), reconnections, and the cores other work and the
hypervisor took. Bounded: rounds x ages x settings runs of about `--seconds` + 15 s, one
server at a time, on 127.0.0.1. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import ab  # bench/load/ab.py
import h2  # bench/load/h2.py
import run  # bench/load/run.py

WARMUP_S = 2.0


def measure(
    args: argparse.Namespace,
    age: str,
    steer: str,
    k: int,
    work: Path,
    postgres: Any,
    openloop: Path,
    message: Path,
) -> str:
    database = f"balance_{k}_{age.replace('.', '_')}_{steer}"
    steering = {"ALLOCSVC_STEER_CONNECTIONS": "true" if steer == "on" else "false"}
    target = h2.start(
        "w2", work, postgres, database=database, connection_age=float(age), settings=steering
    )
    try:
        shape = h2.Shape(args.conns, 0, rate=args.rate)
        r = h2.run_openloop(openloop, target, message, shape, args.seconds, WARMUP_S)
    finally:
        target.setup.stop()
    by_worker = r["by_worker"]
    line = (
        f"| {k} | {age} | {steer} | {r['rps']:,.0f} | {r['errors']:,} | {r['p50']:.1f} "
        f"| {r['p99']:.1f} "
        f"| {max(by_worker) / max(sum(by_worker), 1):.0%} | {r['reconnects']} "
        f"| {r['other_cores']:.2f} + {r['steal_cores']:.2f} |"
    )
    print(line, f"({r['detail']})", file=sys.stderr)
    return line


def main() -> int:
    signal.signal(signal.SIGTERM, run._exit_on_sigterm)  # stop the servers and the stores
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--ages", default="0,10", help="max_connection_age values, seconds")
    parser.add_argument("--steer", default="off", help="steer_connections: on, off or on,off")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=3200.0, help="calls per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds per run")
    parser.add_argument("--conns", type=int, default=8, help="openloop's connections")
    args = parser.parse_args()
    ages = [f"{float(a):g}" for a in args.ages.split(",")]
    steers = args.steer.split(",")
    if not set(steers) <= {"on", "off"}:
        parser.error("--steer: on, off or both")
    setups = [(age, steer) for age in ages for steer in steers]
    lines = [
        ab.heading(),
        "",
        "| round | max_connection_age s | steer | calls/s kept | errors | p50 ms | p99 ms "
        "| busier worker's share | reconnections | other + steal cores |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="allocsvc-balance-") as tmp:
        work = Path(tmp)
        openloop = h2.build_openloop(work)
        _, message, _ = h2.grpc_body(work)
        with run.stores(work) as (postgres, _):
            for k in range(1, args.rounds + 1):
                for age, steer in setups if k % 2 else reversed(setups):
                    lines.append(measure(args, age, steer, k, work, postgres, openloop, message))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
