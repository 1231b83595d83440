"""Load harness (issue 10) with h2load: a load generator light enough to leave the servers their
cores. Unary `Allocate`, and one `AllocateBatch` run of 1,000 items per setup: echo,
`allocsvc serve --workers 1`, `--in-memory` and `--workers 2`.

One command, everything on 127.0.0.1, bounded in count and time:

    python bench/load/h2.py            # default run, about 15-25 minutes
    python bench/load/h2.py --quick    # about 6-12 minutes

ghz (bench/load/run.py) decodes every response with dynamic protobuf and takes about a core of
this 2-core machine. h2load (nghttp2) sends one pre-serialized gRPC request again and again: the
POST body is the 5-byte gRPC frame header and a serialized `AllocateRequest`, with the headers
`content-type: application/grpc` and `te: trailers`. It cannot vary the body, so every call has
the same user id, in a non-sticky experiment (run.py's `BATCH_EXPERIMENT`): each call is
allocated anew (no sticky shortcut). h2load does not read gRPC trailers, so errors are counted
by the server: allocsvc runs with `--metrics-port` and `allocsvc_rpcs_total` by method and code
is scraped before and after each run (every worker's port); for the echo server, which has no
metrics, h2load's HTTP status and the exact size of the response bodies stand in.

Every setup is started first and warmed up; then alternating rounds: each setup's closed-loop
run in turn, the order rotated each round, so that a ratio between setups (allocsvc over echo,
two workers over one) is taken from runs seconds apart, not minutes (this VM's steal drifts over
minutes). Then, for each setup: h2load at a few concurrencies (connections x streams each) as fast
as it can; then the best of them at a fixed rate of 70% of its rate for `--steady` seconds, open
loop, with bench/load/openloop (Go, built here with `go build`): every call is due at its time
whatever happened before it and its latency runs from that due time (h2load's `--rps` sends
bursts and times calls from their send; see STEADY_CONNECTIONS). openloop reads the gRPC
status of every call. Server CPU is the CPU time of the server's process tree, the client's
is its own (rusage of the child), PostgreSQL's is the embedded server's process tree, and the
machine's is /proc/stat, with the part none of these used (`other`) and the hypervisor's
steal. Nothing is pinned. Last, one closed-loop h2load run of a pre-serialized 1,000-item
`AllocateBatch` (each item its own user id), counted in allocations per second.
Before the runs and after them, bench/load/hostprobe.py times fixed work on each CPU for
`--host-probe` seconds: the share of 100-ms windows in which the host made it dearer says how
steady the CPUs were around the run (bench/RESULTS.md item 79).
Server start and stop, the stores, the experiments and the process accounting are run.py's.
The table goes to bench/RESULTS.md, section "Load with h2load (issue 10)".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import benchkit  # bench/load/benchkit.py
import echo  # bench/load/echo.py
import grpc
import hostprobe  # bench/load/hostprobe.py
import run  # bench/load/run.py: the ghz harness's helpers

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.config import BackpressureSettings

SECTION = "## Load with h2load (issue 10)"
PATH = "/allocsvc.v1.Allocator/Allocate"
BATCH_PATH = "/allocsvc.v1.Allocator/AllocateBatch"
BATCH_ITEMS = 1000
# One closed-loop run of AllocateBatch per setup: 2 connections x 2 batches in flight (with
# more, one worker's event loop only queues them).
BATCH_SHAPE = (2, 2)
HEADERS = ("content-type: application/grpc", "te: trailers")
# SO_REUSEPORT spreads connections (not calls) over the workers by a hash of their addresses:
# with 4, one worker often got 3 or all 4. 64 balance better at a fixed rate (where load cannot
# move to the idle worker), but doubled echo's p50 at 1,500/s against 16 (3 alternating rounds),
# so 16, and the table shows each worker's share.
CONNECTIONS = 16
# The fixed-rate run is open loop (bench/load/openloop): h2load's `--rps` paces each connection
# with a timer of at least 10 ms (max(0.01, 1/rps) in nghttp2's h2load.cc), all started
# together, so at 3,000/s over 16 connections it sent bursts of ~30 calls every 10 ms; and it
# timed a call from its send, not from when it was due, so a call waiting for a free stream
# was not counted as waiting. Calls are spread round robin over these connections.
STEADY_CONNECTIONS = 8
# Cores taken by other work and the hypervisor during a fixed-rate run above which its tail is
# the machine's, not the server's: the run is then reported but the bar is not judged.
CONTENDED_CORES = 0.25
STEADY_WARMUP_S = 2.0  # at the fixed rate before its measured window
RAMP = (0.3, 0.4, 0.5, 0.6)  # open-loop steps, as shares of the closed-loop best rate
# Alternating rounds: each setup's closed-loop run at ALTERNATING_SHAPE streams, one setup after
# the other, the order rotated each round; a ratio is taken within each round.
ALTERNATING_STREAMS = 2
ROUNDS = 5  # --quick: 2
# A bar taken from alternating rounds is judged on the median of at least this many uncontended
# rounds: one calm round was enough to call a bar met in one run and missed in the next.
MIN_CALM_ROUNDS = 3
# hostprobe.py before and after the runs: each probe works this share of its CPU.
PROBE_DUTY = 0.1
OPENLOOP = Path(__file__).resolve().parent / "openloop"
ECHO_RESPONSE = 5 + echo.ALLOCATION.ByteSize()  # echo's one answer in its gRPC frame
ECHO_BATCH_RESPONSE = (
    5
    + pb.AllocateBatchResponse(
        results=[pb.AllocateResult(allocation=echo.ALLOCATION)] * BATCH_ITEMS
    ).ByteSize()
)


T = TypeVar("T")


# h2load ------------------------------------------------------------------------------------


def find_h2load() -> str:
    return benchkit.debian_programs("nghttp2-client", "h2load")[0]


def grpc_body(workdir: Path) -> tuple[Path, Path, Path]:
    """The POST body of every unary call (one uncompressed gRPC message, for h2load), the bare
    serialized message (for openloop, which frames it itself) and the body of every batch
    (BATCH_ITEMS items, each its own user id, same context)."""
    path, bare = unary_body(workdir, run.BATCH_EXPERIMENT)
    batch = pb.AllocateBatchRequest(
        requests=[
            pb.AllocateRequest(
                experiment_id=run.BATCH_EXPERIMENT, user_id=f"h2load-{i}", context=benchkit.CONTEXT
            )
            for i in range(BATCH_ITEMS)
        ]
    ).SerializeToString()
    batch_path = workdir / "allocate_batch.bin"
    batch_path.write_bytes(b"\x00" + struct.pack(">I", len(batch)) + batch)
    return path, bare, batch_path


def unary_body(workdir: Path, experiment: str) -> tuple[Path, Path]:
    """`grpc_body`'s unary call (one user id, the same context) in `experiment`: its POST body
    and its bare message, in files named after the experiment."""
    message = pb.AllocateRequest(
        experiment_id=experiment, user_id="h2load-user", context=benchkit.CONTEXT
    ).SerializeToString()
    name = "allocate" if experiment == run.BATCH_EXPERIMENT else f"allocate-{experiment}"
    path = workdir / f"{name}.bin"
    path.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)
    bare = workdir / f"{name}.msg"
    bare.write_bytes(message)
    return path, bare


@dataclass(frozen=True)
class Shape:
    """One h2load run: connections, streams in flight on each, total rate (0: unbounded)."""

    connections: int
    streams: int
    rate: int = 0
    ramp: bool = False  # a short open-loop step below the fixed-rate run
    batch: int = 0  # items per AllocateBatch call (0: unary Allocate)

    @property
    def label(self) -> str:
        if self.batch:
            return f"`AllocateBatch` x{self.batch:,}, {self.connections} conn. x {self.streams}"
        if self.rate:
            kind = "open-loop ramp" if self.ramp else "open loop"
            return f"`Allocate` @ {self.rate:,}/s, {kind} ({self.connections} conn.)"
        return f"`Allocate`, {self.connections} conn. x {self.streams}"


def _machine() -> tuple[float, float]:
    """CPU seconds of the whole machine so far, all cores (/proc/stat): busy (stolen time
    left out) and stolen (the hypervisor ran something else while this VM wanted to run)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    busy = sum(values[:7]) - idle  # user, nice, system, irq, softirq
    return busy / run.CLOCK_TICKS, values[7] / run.CLOCK_TICKS


def rpc_counts(ports: list[int], method: str = "Allocate") -> list[dict[str, int]]:
    """`allocsvc_rpcs_total` of `method` by code, one mapping per worker's port."""
    per_port = []
    pattern = re.compile(
        rf'^allocsvc_rpcs_total\{{(?=[^}}]*method="{method}")[^}}]*code="(\w+)"[^}}]*\}} (\S+)$',
        re.M,
    )
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        per_port.append({code: int(float(value)) for code, value in pattern.findall(text)})
    return per_port


def _wait_metrics(ports: list[int], seconds: float = 60) -> None:
    """Until every worker serves its metrics (workers start one after the other)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            rpc_counts(ports)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _parse(stdout: str) -> dict[str, float]:
    numbers: dict[str, float] = {}
    # "finished in 10.00s, ..." (or "967.00ms" for a run shorter than a second)
    done = re.search(r"finished in ([\d.]+)m?s, ([\d.]+) req/s", stdout)
    requests = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        stdout,
    )
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", stdout)
    traffic = re.search(r"traffic: .* \((\d+)\) data", stdout)
    if not (done and requests and statuses and traffic):
        raise RuntimeError(f"h2load's summary not understood:\n{stdout[-2000:]}")
    numbers["rps"] = float(done.group(2))
    keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    numbers.update(zip(keys, map(float, requests.groups()), strict=True))
    numbers["non_2xx"] = sum(float(v) for v in statuses.groups()[1:])
    numbers["data_bytes"] = float(traffic.group(1))
    return numbers


def _latencies_ms(log: Path) -> tuple[list[float], int]:
    """Sorted latencies of the answered (HTTP 200) calls in h2load's log; the other rows."""
    answered, other = [], 0
    with log.open() as rows:
        for row in rows:
            fields = row.split("\t")
            if len(fields) >= 3 and fields[1] == "200":
                answered.append(int(fields[2]) / 1000)
            else:
                other += 1
    answered.sort()
    return answered, other


@dataclass
class Target:
    """A setup under load and where to read its RPC counts (none for echo)."""

    setup: run.Setup
    metrics_ports: list[int]
    workdir: Path
    # The data directory of the embedded PostgreSQL the setup runs next to (None: none).
    pg_dir: Path | None


class Accounting:
    """CPU of the server, PostgreSQL, the client and the machine (busy and stolen), and the
    server's RPC counts, from before a run to after it."""

    def __init__(self, target: Target, method: str = "Allocate") -> None:
        self.target, self.method = target, method
        self.before = rpc_counts(target.metrics_ports, method) if target.metrics_ports else []
        self.pids, self.pg_pids = target.setup.pids(), run.postgres_pids(target.pg_dir)
        self.cpu0, self.pg0 = run._cpu_seconds(self.pids), run._cpu_seconds(self.pg_pids)
        self.loop0 = run._main_thread_cpu_seconds(self.pids)
        self.client0 = os.times()
        self.machine0, self.wall0 = _machine(), time.monotonic()

    def finish(self, count: int, served: int | None = None) -> dict[str, Any]:
        """Cores used (CPU s / wall s) and the server-side error count and detail, for a run
        in which the client saw `count` calls answered (of `served` the server answered in
        all, warm-up included: the server's CPU per call is over those)."""
        machine1, wall = _machine(), time.monotonic() - self.wall0
        client1 = os.times()
        cpu = run._cpu_seconds(self.pids) - self.cpu0
        loop = run._main_thread_cpu_seconds(self.pids) - self.loop0
        pg = run._cpu_seconds(self.pg_pids) - self.pg0
        client = (client1.children_user + client1.children_system) - (
            self.client0.children_user + self.client0.children_system
        )
        busy = (machine1[0] - self.machine0[0]) / wall
        out: dict[str, Any] = {
            "cpu_us_per_request": cpu / max(served or count, 1) * 1e6,
            # The part of it on the main threads (the event loops, where Python runs).
            "loop_us_per_request": loop / max(served or count, 1) * 1e6,
            "server_cores": cpu / wall,
            "client_cores": client / wall,
            "postgres_cores": pg / wall,
            "machine_cores": busy,
            # Busy cores that were none of ours: other work on the machine.
            "other_cores": max(0.0, busy - (cpu + pg + client) / wall),
            "steal_cores": (machine1[1] - self.machine0[1]) / wall,
            "rss_mib": run._rss_kib(self.target.setup.pids()) / 1024,
            "server_errors": 0,
            "detail": "",
        }
        if not self.target.metrics_ports:
            return out
        per_worker = [
            {c: n - old.get(c, 0) for c, n in new.items()}
            for old, new in zip(
                self.before, rpc_counts(self.target.metrics_ports, self.method), strict=True
            )
        ]
        by_code: dict[str, int] = {}
        for counts in per_worker:
            for c, n in counts.items():
                by_code[c] = by_code.get(c, 0) + n
        errors = sum(n for c, n in by_code.items() if c != "OK")
        # Every call the client saw answered must have been counted by a handler (the server
        # may count a few more: calls in flight when the client stopped).
        missing = max(0, count - sum(by_code.values()))
        detail = ", ".join(f"{c} {n:,}" for c, n in sorted(by_code.items()) if n)
        if missing:
            detail += f", {missing:,} answered but not counted"
        # Calls each worker counted (its share).
        out["by_worker"] = [sum(c.values()) for c in per_worker]
        if len(per_worker) > 1:
            split = " / ".join(f"{n:,}" for n in out["by_worker"])
            detail += f" (by worker: {split})"
        out["server_errors"] = errors + missing
        out["server_ok"] = by_code.get("OK", 0)
        out["detail"] = detail
        return out


def h2load_command(
    h2load: str,
    target: str,
    body: Path,
    connections: int,
    streams: int,
    batch: bool,
    options: list[str],
) -> list[str]:
    """h2load sending `body` as gRPC calls of Allocate (AllocateBatch with `batch`) to `target`
    (host:port) on one thread, `streams` in flight on each of `connections`; `options` add to
    it (how long or how many)."""
    command = [h2load, "-t", "1", "-c", str(connections), "-m", str(streams), "-d", str(body)]
    for header in HEADERS:
        command += ["-H", header]
    return [*command, *options, f"http://{target}{BATCH_PATH if batch else PATH}"]


def run_h2load(
    h2load: str, target: Target, body: Path, shape: Shape, seconds: float
) -> dict[str, Any]:
    setup = target.setup
    log = target.workdir / "h2load.log"
    log.unlink(missing_ok=True)
    command = h2load_command(
        h2load,
        setup.target,
        body,
        shape.connections,
        shape.streams,
        shape.batch > 0,
        ["-D", f"{max(1, round(seconds))}", "--log-file", str(log)],
    )
    if shape.rate:
        # h2load's own pacing (bursts per connection, see STEADY_CONNECTIONS): for CPU per
        # call at a fixed load (bench/load/ab.py --rate), not for latencies.
        command[-1:-1] = ["--rps", str(max(1, round(shape.rate / shape.connections)))]
    accounting = Accounting(target, "AllocateBatch" if shape.batch else "Allocate")
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"h2load against {setup.name} failed:\n{done.stderr[-2000:]}")
    numbers = _parse(done.stdout)
    latencies, not_200 = _latencies_ms(log)
    count = int(numbers["succeeded"])
    used = accounting.finish(count)
    errors = int(numbers["failed"] + numbers["errored"] + numbers["timeout"] + numbers["non_2xx"])
    errors += used.pop("server_errors")
    # Calls answered OK (a refused call is an HTTP 200 to h2load: its gRPC status is in the
    # trailers, which allocsvc's own counts see).
    ok = used.pop("server_ok", None)
    detail = used.pop("detail")
    if not target.metrics_ports:
        # Echo answers the same message every time: every body must be exactly that one
        # (h2load counts bodies of calls cut off at the end of the run too, hence >=).
        size = ECHO_BATCH_RESPONSE if shape.batch else ECHO_RESPONSE
        data = int(numbers["data_bytes"])
        wrong = data < size * count or data % size != 0
        errors += count if wrong else 0
        detail = f"{data // size:,} bodies of {size:,} B"
    if not_200:
        detail += f"; {not_200:,} log rows not HTTP 200"
    percentiles = [run._percentile(latencies, q) for q in (0.50, 0.95, 0.99, 0.999)]
    row = _row(shape, seconds, count, errors, detail, numbers["rps"], percentiles, used)
    row["ok_per_s"] = (count - errors if ok is None else ok) / seconds
    return row


def _row(
    shape: Shape,
    seconds: float,
    count: int,
    errors: int,
    detail: str,
    rps: float,
    percentiles: list[float],
    used: dict[str, Any],
) -> dict[str, Any]:
    """One run's row of the report: latency percentiles p50, p95, p99 and p99.9 in ms, and
    the CPU and memory `Accounting.finish` measured."""
    p50, p95, p99, p999 = percentiles
    return {
        "shape": shape,
        "seconds": seconds,
        "count": count,
        "errors": errors,
        "detail": detail,
        "rps": rps,
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "p999": p999,
        **used,
    }


def build_openloop(workdir: Path) -> Path:
    """bench/load/openloop built into workdir (needs `go`; modules from the Go proxy)."""
    binary = workdir / "openloop"
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("go is missing: the fixed-rate runs need it (bench/load/openloop)")
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=OPENLOOP, check=True, timeout=600)
    return binary


def openloop_command(
    openloop: Path,
    target: str,
    message: Path,
    rate: float,
    connections: int,
    seconds: float,
    warmup: float,
    series: Path | None = None,
) -> list[str]:
    """bench/load/openloop sending `message` to `PATH` at `rate` calls/s over `connections`
    for `seconds` after `warmup` unmeasured; `series`: a file for each measured call's due
    time and latency."""
    command = [str(openloop), "-target", target, "-method", PATH, "-body", str(message)]
    command += ["-rate", str(rate), "-conns", str(connections)]
    command += ["-duration", f"{seconds}s", "-warmup", f"{warmup}s"]
    return command + ([] if series is None else ["-series", str(series)])


def run_openloop(
    openloop: Path, target: Target, message: Path, shape: Shape, seconds: float, warmup: float
) -> dict[str, Any]:
    """A fixed-rate run, open loop: latencies from each call's due time (bench/load/openloop)."""
    command = openloop_command(
        openloop, target.setup.target, message, shape.rate, shape.connections, seconds, warmup
    )
    accounting = Accounting(target)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + warmup + 120)
    if done.returncode != 0:
        raise RuntimeError(f"openloop against {target.setup.name} failed:\n{done.stderr[-2000:]}")
    numbers = json.loads(done.stdout)
    codes: dict[str, int] = numbers["codes"]
    count = codes.get("OK", 0)
    # The warm-up's calls were served too (all answered, or the window's errors show why not).
    used = accounting.finish(count, count + round(shape.rate * warmup))
    errors = sum(n for c, n in codes.items() if c != "OK") + used.pop("server_errors")
    detail = used.pop("detail")
    client = ", ".join(f"{c} {n:,}" for c, n in sorted(codes.items()))
    if not target.metrics_ports:
        # Echo answers the same message every time: every answer must be exactly that one.
        sizes = {int(k): n for k, n in numbers["response_sizes"].items()}
        wrong = sum(n for size, n in sizes.items() if size != ECHO_RESPONSE - 5)
        errors += wrong
        detail = f"{count - wrong:,} answers of {ECHO_RESPONSE - 5} B"
    detail = f"client: {client}" + (f"; server: {detail}" if detail else "")
    detail += f"; send lag p99 {numbers['lag_p99_ms']:.2f} ms"
    # Connections the server aged out (GOAWAY, `max_connection_age`), replaced.
    used["reconnects"] = numbers.get("reconnects", 0)
    if used["reconnects"]:
        detail += f"; {used['reconnects']} reconnections"
    percentiles = [numbers[f"{p}_ms"] for p in ("p50", "p95", "p99", "p999")]
    return _row(shape, seconds, count, errors, detail, numbers["rps"], percentiles, used)


# Plan --------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[Shape]:
    """Concurrencies to find saturation: calls in flight 16, 32, 128 (--quick: 16, 64)."""
    streams = (1, 4) if args.quick else (1, 2, 8)
    return [Shape(CONNECTIONS, s) for s in streams]


def rotated(items: Sequence[T], round_: int) -> list[T]:
    """`items` in the order of round `round_` (0 first): each round starts one further on."""
    k = round_ % len(items)
    return [*items[k:], *items[:k]]


def alternate(
    h2load: str, targets: dict[str, Target], body: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Closed-loop unary runs of every setup in turn, `args.rounds` times, the order rotated
    each round: a ratio between two setups is taken from the runs of one round, seconds
    apart, so that the host's load drifting over the run (other VMs' steal comes and goes
    over minutes) does not land on one setup only."""
    shape = Shape(CONNECTIONS, ALTERNATING_STREAMS)
    rows = []
    for k in range(args.rounds):
        for name in rotated(list(targets), k):
            target = targets[name]
            waited = wait_quiet(target, args.quiet_wait)
            print(f"round {k + 1}: {name} {shape.label} (waited {waited:.0f} s)", file=sys.stderr)
            rows.append(
                {
                    **run_h2load(h2load, target, body, shape, args.duration),
                    "setup": name,
                    "round": k,
                }
            )
    return rows


def measure(
    h2load: str,
    openloop: Path,
    target: Target,
    bodies: tuple[Path, Path, Path],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    name = target.setup.name
    body, message, batch_body = bodies
    rows = []
    for shape in plan(args):
        waited = wait_quiet(target, args.quiet_wait)
        print(f"{name}: {shape.label} (waited {waited:.0f} s for quiet)", file=sys.stderr)
        rows.append(run_h2load(h2load, target, body, shape, args.duration))
    best = max(rows, key=lambda r: r["rps"])
    # Open loop, the server gets calls one by one, not in the batches a closed loop's full
    # pipes bring (one read, one loop turn for several calls): its capacity is lower. Short
    # steps up to the fixed rate show where its tail grows; they stop once p99 passes 50 ms
    # (on an uncontended machine).
    for share in RAMP:
        ramp = Shape(STEADY_CONNECTIONS, 0, rate=max(1, int(share * best["rps"])), ramp=True)
        waited = wait_quiet(target, args.quiet_wait)
        print(f"{name}: {ramp.label} (waited {waited:.0f} s)", file=sys.stderr)
        rows.append(run_openloop(openloop, target, message, ramp, args.ramp, 1.0))
        if rows[-1]["p99"] > 50 and not _contended(rows[-1]):
            break
    steady = Shape(STEADY_CONNECTIONS, 0, rate=max(1, int(0.7 * best["rps"])))
    waited = wait_quiet(target, args.quiet_wait)
    print(f"{name}: {steady.label} for {args.steady:g} s (waited {waited:.0f} s)", file=sys.stderr)
    rows.append(run_openloop(openloop, target, message, steady, args.steady, STEADY_WARMUP_S))
    batch = Shape(*BATCH_SHAPE, batch=BATCH_ITEMS)
    run_h2load(h2load, target, batch_body, batch, args.warmup)
    waited = wait_quiet(target, args.quiet_wait)
    print(f"{name}: {batch.label} (waited {waited:.0f} s)", file=sys.stderr)
    rows.append(run_h2load(h2load, target, batch_body, batch, args.duration))
    if target.pg_dir is not None and past_block_bound(target):
        # Refusals from here on were the bound's (bench/RESULTS.md item 26), not a fault.
        rows[-1]["past_bound"] = True
        rows[-1]["detail"] += "; blocks reached max_unexpanded_assignments (server log)"
    return rows


# The write-behind's warning once blocks reach `backpressure.max_unexpanded_assignments`.
BOUND_WARNING = "assignment blocks at max_unexpanded_assignments"


def past_block_bound(target: Target) -> bool:
    """Whether a process of the setup logged `BOUND_WARNING` (run.py's log per process)."""
    logs = target.workdir.glob(f"{target.setup.name}-*.log")
    return any(BOUND_WARNING in log.read_text(errors="replace") for log in logs)


# Report ------------------------------------------------------------------------------------


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The unary closed-loop run with the most calls per second."""
    found = [r for r in rows if not r["shape"].rate and not r["shape"].batch]
    return max(found, key=lambda r: r["rps"]) if found else None


def _batch(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["shape"].batch), None)


def _steady(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["shape"].rate and not r["shape"].ramp), None)


def _knee(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest open-loop rate (ramp or fixed-rate run) that kept its rate with p99 under
    5 ms and no errors."""
    ok = [
        r
        for r in rows
        if r["shape"].rate
        and r["p99"] < 5
        and not r["errors"]
        and r["rps"] >= 0.97 * r["shape"].rate
    ]
    return max(ok, key=lambda r: r["shape"].rate) if ok else None


def _taken(row: dict[str, Any]) -> float:
    """Cores other work and the hypervisor took during a run."""
    return float(row["other_cores"] + row["steal_cores"])


def _contended(row: dict[str, Any]) -> bool:
    return _taken(row) > CONTENDED_CORES


def wait_quiet(target: Target, seconds: float) -> float:
    """Wait up to `seconds` for a second in which other work and steal took at most
    CONTENDED_CORES (the servers idle meanwhile); the seconds waited."""
    started = time.monotonic()
    pids = target.setup.pids() + run.postgres_pids(target.pg_dir)
    while True:
        machine0, ours0, wall0 = _machine(), run._cpu_seconds(pids), time.monotonic()
        time.sleep(1.0)
        machine1, ours1 = _machine(), run._cpu_seconds(pids)
        wall = time.monotonic() - wall0
        other = (machine1[0] - machine0[0] - (ours1 - ours0)) / wall
        steal = (machine1[1] - machine0[1]) / wall
        waited = time.monotonic() - started
        if other + steal <= CONTENDED_CORES or waited >= seconds:
            return waited


def round_ratios(
    alternating: list[dict[str, Any]],
    name: str,
    base: str,
    figure: Callable[[dict[str, Any]], float] = operator.itemgetter("rps"),
) -> list[tuple[float, bool]]:
    """Per round, `name`'s figure over `base`'s, and whether either run was contended (none
    for a round where `base`'s figure is 0)."""
    by = {(r["round"], r["setup"]): r for r in alternating}
    out = []
    for k in sorted({r["round"] for r in alternating}):
        a, b = by.get((k, name)), by.get((k, base))
        if a and b and figure(b):
            out.append((figure(a) / figure(b), _contended(a) or _contended(b)))
    return out


def per_server_core(r: dict[str, Any]) -> float:
    """Req/s per core the server used: what a worker with a core of its own would do."""
    return r["rps"] / r["server_cores"] if r["server_cores"] else 0.0


def calm_median(ratios: list[tuple[float, bool]]) -> float | None:
    """The median of the uncontended rounds' ratios; None below MIN_CALM_ROUNDS of them."""
    calm = [x for x, contended in ratios if not contended]
    return statistics.median(calm) if len(calm) >= MIN_CALM_ROUNDS else None


def alternating_table(alternating: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    if not alternating:
        return []
    lines = [
        f"Alternating rounds: {args.rounds} rounds, each a closed-loop run of every setup in "
        f"turn ({CONNECTIONS} conn. x {ALTERNATING_STREAMS}, {args.duration:g} s, the order "
        "rotated each round), before the runs above; a ratio below is taken within each "
        "round (runs seconds apart), then the median over the uncontended rounds (other work "
        f"and steal at most {CONTENDED_CORES} cores in both runs), judged only when at least "
        f"{MIN_CALM_ROUNDS} rounds were uncontended.",
        "",
        "| round | setup | req/s | p99 | errors | server CPU µs/call | server cores "
        "| client cores | pg cores | other cores | steal cores | req/s vs echo (same round) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    echo = {r["round"]: r for r in alternating if r["setup"] == "echo"}
    for r in sorted(alternating, key=lambda r: (r["round"], r["setup"])):
        base = echo.get(r["round"])
        ratio = "-" if r["setup"] == "echo" or base is None else f"{r['rps'] / base['rps']:.0%}"
        lines.append(
            f"| {r['round'] + 1} | {r['setup']} | {r['rps']:,.0f} | {r['p99']:.2f} "
            f"| {r['errors']} | {r['cpu_us_per_request']:,.0f} | {r['server_cores']:.2f} "
            f"| {r['client_cores']:.2f} | {r['postgres_cores']:.2f} | {r['other_cores']:.2f} "
            f"| {r['steal_cores']:.2f} | {ratio} |"
        )
    return lines


def bars(
    results: dict[str, list[dict[str, Any]]],
    alternating: list[dict[str, Any]],
    args: argparse.Namespace,
) -> list[str]:
    lines = ["| bar (issue 10) | measured | status |", "|---|---:|---|"]

    def row(text: str, value: str, ok: bool | None) -> None:
        status = "(info)" if ok is None else ("met" if ok else "**NOT met**")
        lines.append(f"| {text} | {value} | {status} |")

    def alternated(
        text: str,
        name: str,
        base: str,
        bar: float | None,
        times: bool = False,
        figure: Callable[[dict[str, Any]], float] = operator.itemgetter("rps"),
        scale: float = 1.0,
    ) -> None:
        """The median of the per-round ratios (of `figure`, times `scale`) over uncontended
        rounds, judged against `bar` (None: reported only); `times`: shown as 1.54x rather
        than 154%."""
        ratios = [(scale * x, c) for x, c in round_ratios(alternating, name, base, figure)]
        if not ratios:
            return

        def fmt(x: float) -> str:
            return f"{x:.2f}x" if times else f"{x:.0%}"

        shown = ", ".join(fmt(x) + (" contended" if c else "") for x, c in ratios)
        median = calm_median(ratios)
        if median is None:
            calm = sum(not c for _, c in ratios)
            row(
                f"{text} (**{calm} of {len(ratios)} rounds uncontended**, fewer than "
                f"{MIN_CALM_ROUNDS}: not judged)",
                shown,
                None,
            )
            return
        row(
            f"{text}: median of the uncontended rounds (each round)",
            f"{fmt(median)} ({shown})",
            None if bar is None else median >= bar,
        )

    w1, echo, w2 = results.get("w1", []), results.get("echo", []), results.get("w2", [])
    u1, ue, u2 = _best(w1), _best(echo), _best(w2)
    alternated("unary `Allocate` >= 80% of echo's req/s, alternating rounds", "w1", "echo", 0.8)
    alternated(
        "  the same from memory only (`mem`: no PostgreSQL write-behind)", "mem", "echo", None
    )
    if u1 and ue:
        contended = _contended(u1) or _contended(ue)
        row(
            "  unary `Allocate` over echo's req/s, best concurrency of each setup's own runs"
            + (
                f" (**machine contended**: other work and steal took {_taken(ue):.2f} cores "
                f"in echo's run, {_taken(u1):.2f} in allocsvc's)"
                if contended
                else ""
            ),
            f"{u1['rps'] / ue['rps']:.0%}",
            None,
        )
        row(
            "  server CPU per call, allocsvc over echo (µs)",
            f"{u1['cpu_us_per_request']:,.0f} / {ue['cpu_us_per_request']:,.0f}",
            None,
        )
    um = _best(results.get("mem", []))
    if um and ue:
        row(
            "  the same from memory only (`mem`: no PostgreSQL write-behind), over echo: "
            "req/s, server CPU per call (µs)",
            f"{um['rps'] / ue['rps']:.0%}, {um['cpu_us_per_request']:,.0f}",
            None,
        )
    s1 = _steady(w1)
    if s1:
        # Other work on the machine or the hypervisor's steal takes cores the server needs:
        # the tail measures the machine then, not the server (bench/load/stalls.py shows the
        # loop's thread waiting for a CPU). Such a run is reported, not judged.
        busy, contended = _taken(s1), _contended(s1)
        row(
            f"p99 < 5 ms at 70% of saturation, one worker ({s1['shape'].rate:,}/s)"
            + (
                f" (**machine contended**: other work and steal took {busy:.2f} cores)"
                if contended
                else ""
            ),
            f"{s1['p99']:.2f} ms",
            None if contended else s1["p99"] < 5,
        )
    for name in ("echo", "w1", "mem", "w2"):
        rows = results.get(name, [])
        best, knee = _best(rows), _knee(rows)
        if best:
            row(
                f"  {name}: highest open-loop rate with p99 < 5 ms (share of its closed-loop "
                "best; cores taken by other work + steal in that run)",
                (
                    f"{knee['shape'].rate:,}/s ({knee['shape'].rate / best['rps']:.0%}; "
                    f"{knee['other_cores']:.2f} + {knee['steal_cores']:.2f})"
                    if knee
                    else f"none from {int(RAMP[0] * best['rps']):,}/s"
                ),
                None,
            )
    for name in ("echo", "w1", "mem", "w2"):
        steady = _steady(results.get(name, []))
        if steady:
            row(
                f"  {name} at 70% of its saturation: rate kept (req/s / asked), p99; "
                "cores taken by other work + steal",
                f"{steady['rps'] / steady['shape'].rate:.0%}, {steady['p99']:.2f} ms; "
                f"{steady['other_cores']:.2f} + {steady['steal_cores']:.2f}",
                None,
            )
    b1, be, bm = _batch(w1), _batch(echo), _batch(results.get("mem", []))
    if b1:
        per_s = b1["ok_per_s"] * b1["shape"].batch
        bound = " (blocks reached `max_unexpanded_assignments`)" if b1.get("past_bound") else ""
        row(
            f"`AllocateBatch` x{b1['shape'].batch:,} >= 1M allocations/s, one worker "
            "(with PostgreSQL: every assignment written behind; OK batches only)",
            f"{per_s:,.0f}/s{bound}",
            per_s >= 1_000_000,
        )
        if per_s:
            row(
                "  how long the default `max_unexpanded_assignments` "
                f"({DEFAULT_MAX_UNEXPANDED:,}) holds that rate from an empty backlog; past "
                "it, flushes write rows (PostgreSQL's row rate) and batches are refused",
                f"{DEFAULT_MAX_UNEXPANDED / per_s:,.1f} s",
                None,
            )
    for name, r in (("mem", bm), ("echo", be)):
        if r:
            row(
                f"  {name}: `AllocateBatch` x{r['shape'].batch:,}, allocations/s answered OK "
                "(server CPU per call)",
                f"{r['ok_per_s'] * r['shape'].batch:,.0f}/s "
                f"({r['cpu_us_per_request'] / 1000:.2f} ms)",
                None,
            )
    for name, rows in (("one worker", w1), ("two workers", w2)):
        steady = _steady(rows)
        if steady:
            # As for the tail: with cores taken away, 70% of the saturation measured before
            # may be more than the server can do then, and gRPC sheds what it cannot take.
            short, contended = steady["seconds"] < 60, _contended(steady)
            row(
                f"zero errors over {steady['seconds']:g} s at 70% of saturation, {name}"
                + (" (--quick: the bar asks 60 s)" if short else "")
                + (
                    f" (**machine contended**: other work and steal took {_taken(steady):.2f} "
                    "cores)"
                    if contended
                    else ""
                ),
                f"{steady['errors']} in {steady['count']:,}",
                None if short or contended else steady["errors"] == 0,
            )
    alternated(
        "`--workers 2` / `--workers 1`, req/s, h2load on the same cores, alternating rounds",
        "w2",
        "w1",
        1.6,
        times=True,
    )
    # Judged on the alternating rounds, as the ratios above: each setup's own runs are
    # minutes apart, and a run's CPU per call drifts by a fifth between them.
    alternated(
        "`--workers 2` / `--workers 1`, h2load accounted for, alternating rounds: 2 x (req/s "
        "per server core) over 1 x (req/s per server core)",
        "w2",
        "w1",
        1.6,
        times=True,
        figure=per_server_core,
        scale=2.0,
    )
    if u1 and u2:
        row(
            "  `--workers 2` / `--workers 1`, req/s, best of each setup's own runs",
            f"{u2['rps'] / u1['rps']:.2f}x",
            None,
        )
        row(
            "  the same accounted for h2load, best of each setup's own runs (minutes apart)",
            f"{2 * per_server_core(u2) / per_server_core(u1):.2f}x",
            None,
        )
        row(
            "  cores left to two workers: nproc - h2load - PostgreSQL (server cores used)",
            f"{(os.cpu_count() or 1) - u2['client_cores'] - u2['postgres_cores']:.2f} "
            f"({u2['server_cores']:.2f})",
            None,
        )
    return lines


def host_line(
    host: Sequence[tuple[str, Mapping[int, tuple[float, float]]]], args: argparse.Namespace
) -> str:
    """What bench/load/hostprobe.py found of the host, when it ran (item 79: the CPUs of this VM
    slow down in spells, and calls cost more in them)."""
    if not host:
        return ""
    found = "; ".join(
        f"{when}, {' / '.join(f'{share:.0%}' for share, _ in state.values())} "
        f"({' / '.join(f'{us:.0f}' for _, us in state.values())} µs)"
        for when, state in host
    )
    cpus = " / ".join(str(cpu) for cpu in host[0][1])
    return (
        f" The host's CPUs ({cpus}), by `bench/load/hostprobe.py` for {args.host_probe:g} s: "
        f"the share of 100-ms windows in which fixed work took {hostprobe.SPELL_RATIO:g}x its "
        f"fastest or more (that fastest, µs a unit; bench/RESULTS.md item 79): {found}."
    )


def report(
    results: dict[str, list[dict[str, Any]]],
    alternating: list[dict[str, Any]],
    args: argparse.Namespace,
    started: str,
    host: Sequence[tuple[str, Mapping[int, tuple[float, float]]]] = (),
) -> str:
    echo = _best(results.get("echo", []))
    echo_batch = _batch(results.get("echo", []))
    version = subprocess.run([args.h2load, "--version"], capture_output=True, text=True)
    lines = [
        SECTION,
        "",
        f"Command: `cd {run.ROOT} && {' '.join(['python', *sys.argv])}` "
        "(`make bench-load-h2` runs the default).",
        "",
        f"Date: {started}. Machine: {benchkit.cpu_model()}, nproc {os.cpu_count()}, Python "
        f"{sys.version.split()[0]}, grpcio {grpc.__version__}, {version.stdout.strip()}; load "
        f"average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}. **h2load, the "
        "servers and PostgreSQL share these cores, and so may other work (the `other` and "
        "`steal` columns): ratios within this run matter most.** Before each measured run "
        f"the harness waits up to {args.quiet_wait:g} s for a second in which other work and "
        f"steal take at most {CONTENDED_CORES} cores; a bar whose runs had more taken is "
        "reported but not judged." + host_line(host, args),
        "",
        f"Warm-up {args.warmup:g} s per setup, then {args.duration:g} s per concurrency "
        f"(h2load `-t 1`, {CONNECTIONS} connections x streams in flight on each; latencies "
        "from h2load's per-request log, from each call's send to the end of its response), "
        f"then open-loop ramp steps of {args.ramp:g} s (after 1 s unmeasured) at "
        f"{', '.join(f'{x:.0%}' for x in RAMP)} of the setup's best rate (stopping once p99 "
        "passes 50 ms unless the machine was contended), then "
        f"{args.steady:g} s (after {STEADY_WARMUP_S:g} s unmeasured) at "
        "70% of the setup's best rate, **open loop** with bench/load/openloop (a small Go "
        "HTTP/2 client, "
        f"calls due evenly spaced, round robin over {STEADY_CONNECTIONS} connections; each "
        "call's latency from its **due time**, so queueing anywhere, in the client too, is "
        "counted; its send lag p99 is in the last column). h2load's own `--rps` is not used: "
        "it paces each connection with a timer of at least 10 ms, all connections together, "
        "so it sent bursts, and it timed calls from their send. Every call is the same "
        "pre-serialized `AllocateRequest`: one user id and an Instagram/iPhone/US context, "
        "in a 5-variant **non-sticky** experiment segmented by source and device, so every "
        "call is allocated anew. Errors: h2load's failed streams and non-2xx answers, or "
        "openloop's non-OK gRPC statuses, plus for allocsvc the non-OK codes of "
        "`allocsvc_rpcs_total` (allocsvc runs "
        "with `--metrics-port`; every worker's port is read before and after each run) and "
        "answered calls no handler counted; for echo (no metrics) a body of any other size "
        "than its one answer is an error (h2load: counts all calls of the run as errors). CPU: "
        "`server` is the server's process tree (workers included), `client` h2load's or "
        "openloop's own, `pg` the embedded PostgreSQL's tree, `machine` all busy cores of "
        "the machine (/proc/stat), `other` the busy cores none of these used (other work on "
        "the machine), `steal` the cores the hypervisor took from this VM while it wanted "
        "to run (/proc/stat steal: the VM's 2 cores are shared with other VMs), each as "
        "cores = CPU s / wall s; server CPU per call is over the calls the client counted "
        "(at a fixed rate, warm-up included). Nothing is pinned. Setups: `echo` "
        "(bench/load/echo.py), "
        "`w1` (`allocsvc serve --workers 1`), `w2` (`--workers 2`, SO_REUSEPORT; connections "
        f"aged after {TWO_WORKER_AGE_S:g} s, past the closed-loop runs, which h2load cannot "
        "carry on after a GOAWAY; one worker's never), each on "
        "the embedded PostgreSQL (one database each; `backpressure.max_unexpanded_assignments` "
        f"{BENCH_MAX_UNEXPANDED:,} instead of its default {DEFAULT_MAX_UNEXPANDED:,}, so that "
        "a batch row measures the rate, not how long the default lasts at it: see the bars), "
        "and `mem` (`--workers 1 --in-memory`: "
        "no PostgreSQL, so no write-behind; it shows what persistence costs per call). "
        f"Last, per setup, {args.duration:g} s of `AllocateBatch` with {BATCH_ITEMS:,} items "
        "(each its own user id, the same context, the non-sticky experiment: every item is "
        f"allocated anew), h2load {BATCH_SHAPE[0]} connections x {BATCH_SHAPE[1]} calls in "
        "flight, after a warm-up as long as the unary one: its req/s are batches/s, its "
        "ratio is to echo's batch row, errors are counted on `AllocateBatch`.",
        "",
        "| setup | run | req/s | p50 | p95 | p99 | p99.9 | errors | server CPU µs/call "
        "| server cores | client cores | pg cores | machine cores | other cores | steal cores "
        "| RSS MiB | req/s vs echo | RPCs counted |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, rows in results.items():
        for r in rows:
            base = echo_batch if r["shape"].batch else echo
            ratio = "-" if name == "echo" or not base or r["shape"].rate else r["rps"] / base["rps"]
            lines.append(
                f"| {name} | {r['shape'].label} | {r['rps']:,.0f} | {r['p50']:.2f} "
                f"| {r['p95']:.2f} | {r['p99']:.2f} | {r['p999']:.2f} | {r['errors']} "
                f"| {r['cpu_us_per_request']:,.0f} | {r['server_cores']:.2f} "
                f"| {r['client_cores']:.2f} | {r['postgres_cores']:.2f} "
                f"| {r['machine_cores']:.2f} | {r['other_cores']:.2f} | {r['steal_cores']:.2f} "
                f"| {r['rss_mib']:,.0f} "
                f"| {ratio if isinstance(ratio, str) else f'{ratio:.0%}'} | {r['detail']} |"
            )
    lines += ["", *alternating_table(alternating, args)]
    lines += [
        "",
        *bars(results, alternating, args),
        "",
        "The accounted ratio assumes what a load generator elsewhere would give: each worker "
        "a core of its own at the work per core it showed here (req/s / server cores), each "
        "round's two-worker run over its one-worker run seconds before or after (judged: the "
        "median over the uncontended rounds; each setup's best runs, minutes apart, are shown "
        "too); it does not see imbalance between the workers or a worker idle for want of "
        "load.",
        "",
    ]
    return "\n".join(lines)


# Main --------------------------------------------------------------------------------------


# h2load does not carry on after a GOAWAY (with connections aged every 8 s its 10-s runs
# answered 12-15% fewer calls, with an error): one worker gains nothing by reconnecting, so its
# connections are never aged, and two workers' are aged after 20 s (the server's default is
# 10 s), past the closed-loop runs' end, so that the 60-s fixed-rate run (openloop reconnects)
# still has its connections drawn again over the workers (bench/load/balance.py).
TWO_WORKER_AGE_S = 20.0

# `backpressure.max_unexpanded_assignments` of the durable setups (w1, w2; the server's default
# is 10,000,000). Past it, flushes write rows, at PostgreSQL's row rate (bench/RESULTS.md, item
# 26), and batches are refused: at 1.2M allocations/s the default lasts about 8 s, less than a
# batch row's warm-up and run. Raised, the row measures the rate; the bar's line says how long
# the default would have held it.
BENCH_MAX_UNEXPANDED = 40_000_000
DEFAULT_MAX_UNEXPANDED: int = BackpressureSettings.model_fields[
    "max_unexpanded_assignments"
].default


def _metrics_ports(workers: int) -> int:
    """A first port with `workers` free ports from it (each worker serves on its own)."""
    for _ in range(50):
        first = run._free_port()
        ports = range(first, first + workers)
        if all(_port_free(p) for p in ports):
            return first
    raise RuntimeError("no run of free ports for the metrics")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start(
    name: str,
    workdir: Path,
    postgres: Any,
    database: str = "",
    redis: str = "",
    connection_age: float | None = None,
    settings: Mapping[str, str] | None = None,
) -> Target:
    """Start a setup and make it ready to measure (experiments created, metrics up); `w1` and
    `w2` on their own database of `postgres` (`database`, else one named after the setup),
    sharing state through `redis` when given; `connection_age`: the servers'
    `max_connection_age` (None: 0 for one worker, `TWO_WORKER_AGE_S` for two); `settings`:
    more of allocsvc's settings, as `ALLOCSVC_` environment variables."""
    pg_dir = None if postgres is None else Path(postgres.data_dir)
    if name == "echo":
        return Target(run.start_echo(workdir), [], workdir, pg_dir)
    if name not in ("w1", "w2", "mem"):
        raise SystemExit(f"unknown setup {name!r}")
    workers = 2 if name == "w2" else 1
    if connection_age is None:
        connection_age = TWO_WORKER_AGE_S if workers == 2 else 0.0
    first = _metrics_ports(workers)
    setup = run.start_allocsvc(
        name,
        workdir,
        "" if name == "mem" else run.database(postgres, database or f"h2load_{name}"),
        workers=workers,
        redis=redis,
        metrics_port=first,
        connection_age=connection_age,
        max_unexpanded=None if name == "mem" else BENCH_MAX_UNEXPANDED,
        settings=settings,
    )
    target = Target(setup, list(range(first, first + workers)), workdir, pg_dir)
    try:
        run._create_experiments(setup)
        run._wait_known(setup)
        _wait_metrics(target.metrics_ports)
    except BaseException:
        setup.stop()
        raise
    return target


def main() -> int:
    import signal

    signal.signal(signal.SIGTERM, run._exit_on_sigterm)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (~2 minutes)")
    parser.add_argument("--duration", type=float, help="measured seconds per concurrency")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per setup")
    parser.add_argument("--steady", type=float, help="seconds of the fixed-rate run")
    parser.add_argument(
        "--setups", default="echo,w1,mem,w2", help="comma-separated: echo, w1, mem, w2"
    )
    parser.add_argument("--ramp", type=float, help="seconds of each open-loop ramp step")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each measured run, wait up to this long for other work to quiet down",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"alternating closed-loop rounds over all setups (0: none; default {ROUNDS}, "
        "--quick 2)",
    )
    parser.add_argument(
        "--host-probe",
        type=float,
        default=20.0,
        help="seconds of bench/load/hostprobe.py before the runs and after them (0: none)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 2 if args.quick else ROUNDS
    args.duration = args.duration or (4.0 if args.quick else 10.0)
    args.warmup = args.warmup or (2.0 if args.quick else 5.0)
    args.steady = args.steady or (10.0 if args.quick else 60.0)
    args.ramp = args.ramp or (3.0 if args.quick else 6.0)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.h2load = find_h2load()
    results: dict[str, list[dict[str, Any]]] = {}
    host: list[tuple[str, Mapping[int, tuple[float, float]]]] = []
    with tempfile.TemporaryDirectory(prefix="allocsvc-h2load-") as tmp:
        workdir = Path(tmp)
        bodies = grpc_body(workdir)
        openloop = build_openloop(workdir)
        if args.host_probe > 0:
            print(f"the host: {args.host_probe:g} s of hostprobe.py", file=sys.stderr)
            host.append(("before", hostprobe.host_state(workdir, args.host_probe, PROBE_DUTY)))
        with run.stores(workdir) as (postgres, _redis_url), contextlib.ExitStack() as up:
            # Every setup runs from the start (idle while another is measured), so that the
            # alternating rounds can go from one to the next.
            targets: dict[str, Target] = {}
            for name in args.setups.split(","):
                targets[name] = start(name, workdir, postgres)
                up.callback(targets[name].setup.stop)
            body = bodies[0]
            for name, target in targets.items():
                print(f"{name}: warm-up {args.warmup:g} s", file=sys.stderr)
                run_h2load(args.h2load, target, body, Shape(CONNECTIONS, 2), args.warmup)
            alternating = alternate(args.h2load, targets, body, args) if args.rounds else []
            for name, target in targets.items():
                results[name] = measure(args.h2load, openloop, target, bodies, args)
                # Done with it: its idle process would only take memory from the next ones.
                target.setup.stop()
        if args.host_probe > 0:
            host.append(("after", hostprobe.host_state(workdir, args.host_probe, PROBE_DUTY)))
    text = report(results, alternating, args, started, host)
    print(text)
    if not args.no_write:
        benchkit.write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
