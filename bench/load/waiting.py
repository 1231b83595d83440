"""What calls waiting for the event loop cost in memory (issue 10, `max_waiting_calls`).

gRPC core reads calls off the connections while the server's event loop is busy and keeps
each one, its headers and what HTTP/2 flow control let in of its message, until a handler
takes it; `backpressure.max_waiting_calls` bounds how many. This measures what each costs:
`allocsvc serve --in-memory` gets the same number of calls twice, once with few in flight
(2 per connection) and once all at once (1,000 per connection), and the difference of the
server's peak RSS (sampled every 50 ms) over the calls that were in flight is the memory of a
waiting call. Unary `Allocate` (h2.py's request) and `AllocateBatch` of 1,000 items (h2.py's
batch), each with its own server; the batches again with `max_in_flight_rpcs` raised, as its
default refuses some of them first.

    python bench/load/waiting.py [--waiting 20000] [--no-write]

Everything on 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import benchkit  # bench/load/benchkit.py
import h2  # bench/load/h2.py
import run  # bench/load/run.py

SECTION = "## Memory of waiting calls (issue 10)"
DEFAULT_WAITING = 20_000  # backpressure.max_waiting_calls' default


@dataclass(frozen=True)
class Kind:
    name: str
    method: str
    calls: int
    connections: int
    streams: int
    max_in_flight: int | None = None  # backpressure.max_in_flight_rpcs; None: the default


KINDS = (
    Kind("unary `Allocate`", "Allocate", 20_000, 20, 1_000),
    Kind("`AllocateBatch` x1,000", "AllocateBatch", 4_000, 4, 1_000),
    # The default in-flight bound (1,000) refuses some of those batches before they take memory.
    Kind(
        "`AllocateBatch` x1,000, `max_in_flight_rpcs` 100,000",
        "AllocateBatch",
        4_000,
        4,
        1_000,
        max_in_flight=100_000,
    ),
)
IN_FLIGHT_ENV = "ALLOCSVC_BACKPRESSURE__MAX_IN_FLIGHT_RPCS"
WAITING_ENV = "ALLOCSVC_BACKPRESSURE__MAX_WAITING_CALLS"


def _rss_mib(pids: list[int]) -> float:
    return run._rss_kib(pids) / 1024


class Peak:
    """The highest RSS of `pids` while it runs, sampled every 50 ms."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self.mib = _rss_mib(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.mib = max(self.mib, _rss_mib(self._pids))

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def burst(kind: Kind, streams: int, waiting: int, workdir: Path) -> dict[str, Any]:
    """`kind.calls` calls against a fresh server, `streams` in flight on each connection."""
    os.environ[WAITING_ENV] = str(waiting)
    if kind.max_in_flight is not None:
        os.environ[IN_FLIGHT_ENV] = str(kind.max_in_flight)
    port = h2._metrics_ports(1)
    setup = run.start_allocsvc("waiting", workdir, "", metrics_port=port)
    try:
        run._create_experiments(setup)
        run._wait_known(setup)
        h2._wait_metrics([port])
        unary, _, batch = h2.grpc_body(workdir)
        body = unary if kind.method == "Allocate" else batch
        pids = setup.pids()
        before = _rss_mib(pids)
        command = h2.h2load_command(
            h2.find_h2load(),
            setup.target,
            body,
            kind.connections,
            streams,
            kind.method == "AllocateBatch",
            ["-n", str(kind.calls)],
        )
        counted = h2.rpc_counts([port], kind.method)[0]
        start = time.monotonic()
        with Peak(pids) as peak:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        seconds = time.monotonic() - start
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed:\n{done.stderr[-2000:]}")
        after = h2.rpc_counts([port], kind.method)[0]
        codes = {code: n - counted.get(code, 0) for code, n in after.items()}
        codes = {code: n for code, n in sorted(codes.items()) if n}
        return {
            "streams": streams,
            "in_flight": min(kind.calls, kind.connections * streams),
            "before": before,
            "peak": peak.mib,
            "codes": codes,
            # Refused by gRPC before any handler: past max_in_flight_rpcs (RESOURCE_EXHAUSTED)
            # or max_waiting_calls (CANCELLED); allocsvc_rpcs_total does not see them.
            "unanswered": kind.calls - sum(codes.values()),
            "seconds": seconds,
            "request_bytes": body.stat().st_size,
        }
    finally:
        setup.stop()
        os.environ.pop(WAITING_ENV, None)
        os.environ.pop(IN_FLIGHT_ENV, None)


def measure(kind: Kind, waiting: int, workdir: Path) -> list[dict[str, Any]]:
    rows = [burst(kind, streams, waiting, workdir) for streams in (2, kind.streams)]
    few, many = rows
    extra = many["in_flight"] - few["in_flight"]
    many["kib_per_call"] = (many["peak"] - few["peak"]) * 1024 / extra
    return rows


def report(results: list[tuple[Kind, list[dict[str, Any]]]], waiting: int, started: str) -> str:
    default = " (the default)" if waiting == DEFAULT_WAITING else ""
    lines = [
        SECTION,
        "",
        "Command: `cd /work/main && python bench/load/waiting.py`.",
        "",
        f"Date: {started}. Machine: {benchkit.machine()}. `allocsvc serve --in-memory`, "
        f"`backpressure.max_waiting_calls` {waiting:,}{default}, "
        "a fresh server per row; "
        "h2load sends the calls (h2.py's unary request and 1,000-item batch), first with 2 in "
        "flight per connection, then all at once. Peak RSS is sampled every 50 ms; the memory "
        "of a waiting call is the difference of the two peaks over the difference of calls "
        "in flight (not all of them wait at the same moment, so it is a lower bound; both "
        "runs grow the held assignments alike). Answered calls are counted by the server "
        "(`allocsvc_rpcs_total`); the rest were refused by gRPC before any handler, past "
        "`backpressure.max_in_flight_rpcs` (RESOURCE_EXHAUSTED) or `max_waiting_calls` "
        "(CANCELLED): h2load does not read gRPC statuses, the last rows tell the two apart "
        "by raising the first.",
        "",
        "| call | request bytes | calls | connections x in flight | RSS before MiB "
        "| peak RSS MiB | answered, by code | refused before a handler | seconds "
        "| KiB per call in flight |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, rows in results:
        for row in rows:
            per_call = f"{row['kib_per_call']:,.0f}" if "kib_per_call" in row else "-"
            codes = ", ".join(f"{code} {n:,}" for code, n in row["codes"].items())
            lines.append(
                f"| {kind.name} | {row['request_bytes']:,} | {kind.calls:,} "
                f"| {kind.connections} x {row['streams']:,} | {row['before']:,.0f} "
                f"| {row['peak']:,.0f} | {codes} | {row['unanswered']:,} "
                f"| {row['seconds']:.1f} | {per_call} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--waiting", type=int, default=DEFAULT_WAITING, help="max_waiting_calls")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="allocsvc-waiting-") as tmp:
        results = [(kind, measure(kind, args.waiting, Path(tmp))) for kind in KINDS]
    text = report(results, args.waiting, started)
    print(text)
    if not args.no_write:
        benchkit.write_section(SECTION, text)


if __name__ == "__main__":
    main()
