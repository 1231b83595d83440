"""Load harness (issue 10) with h2load: a load generator light enough to leave the servers their
cores. Unary `Allocate` only: echo, `allocsvc serve --workers 1` and `--workers 2`.

One command, everything on 127.0.0.1, bounded in count and time:

    python bench/load/h2.py            # default run, about 6 minutes
    python bench/load/h2.py --quick    # about 2 minutes

ghz (bench/load/run.py) decodes every response with dynamic protobuf and takes about a core of
this 2-core machine. h2load (nghttp2) sends one pre-serialized gRPC request again and again: the
POST body is the 5-byte gRPC frame header and a serialized `AllocateRequest`, with the headers
`content-type: application/grpc` and `te: trailers`. It cannot vary the body, so every call has
the same user id, in a non-sticky experiment (run.py's `BATCH_EXPERIMENT`): each call is
allocated anew (no sticky shortcut). h2load does not read gRPC trailers, so errors are counted
by the server: allocsvc runs with `--metrics-port` and `allocsvc_rpcs_total` by method and code
is scraped before and after each run (every worker's port); for the echo server, which has no
metrics, h2load's HTTP status and the exact size of the response bodies stand in.

For each setup: a warm-up, then h2load at a few concurrencies (connections x streams each) as fast
as it can; then the best of them at a fixed rate of 70% of its rate for `--steady` seconds, with
per-request latencies from h2load's `--log-file`. Server CPU is the CPU time of the server's
process tree, h2load's CPU is its own (rusage of the child), PostgreSQL's is the embedded
server's process tree, and the machine's is /proc/stat (other work included). Nothing is pinned.
Server start and stop, the stores, the experiments and the process accounting are run.py's.
The table goes to bench/RESULTS.md, section "Load with h2load (issue 10)".
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchkit  # bench/load/benchkit.py
import echo  # bench/load/echo.py
import grpc
import run  # bench/load/run.py: the ghz harness's helpers

from allocsvc._proto import allocsvc_pb2 as pb

SECTION = "## Load with h2load (issue 10)"
PATH = "/allocsvc.v1.Allocator/Allocate"
HEADERS = ("content-type: application/grpc", "te: trailers")
# SO_REUSEPORT spreads connections (not calls) over the workers by a hash of their addresses:
# with 4, one worker often got 3 or all 4. 64 balance better at a fixed rate (where load cannot
# move to the idle worker), but doubled echo's p50 at 1,500/s against 16 (3 alternating rounds),
# so 16, and the table shows each worker's share.
CONNECTIONS = 16
STEADY_STREAMS = 16  # per connection at a fixed rate: room, so requests rarely wait for a stream
ECHO_RESPONSE = 5 + echo.ALLOCATION.ByteSize()  # echo's one answer in its gRPC frame


# h2load ------------------------------------------------------------------------------------


def find_h2load() -> str:
    found = shutil.which("h2load")
    if found:
        return found
    command = ["apt-get", "install", "-y", "nghttp2-client"]
    print(f"installing h2load: {' '.join(command)}", file=sys.stderr)
    subprocess.run(command, check=True, timeout=600, stdout=subprocess.DEVNULL)
    found = shutil.which("h2load")
    if not found:
        raise RuntimeError("h2load is missing: apt-get install nghttp2-client")
    return found


def grpc_body(workdir: Path) -> Path:
    """The POST body of every call: one uncompressed gRPC message."""
    message = pb.AllocateRequest(
        experiment_id=run.BATCH_EXPERIMENT, user_id="h2load-user", context=benchkit.CONTEXT
    ).SerializeToString()
    path = workdir / "allocate.bin"
    path.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)
    return path


@dataclass(frozen=True)
class Shape:
    """One h2load run: connections, streams in flight on each, total rate (0: unbounded)."""

    connections: int
    streams: int
    rate: int = 0

    @property
    def label(self) -> str:
        if self.rate:
            return f"`Allocate` @ {self.rate:,}/s ({self.connections} conn.)"
        return f"`Allocate`, {self.connections} conn. x {self.streams}"


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / run.CLOCK_TICKS


def _postgres_pids(workdir: Path) -> list[int]:
    pidfile = workdir / "postgres" / "postmaster.pid"
    try:
        return run._tree(int(pidfile.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return []


def rpc_counts(ports: list[int]) -> list[dict[str, int]]:
    """`allocsvc_rpcs_total` of method Allocate by code, one mapping per worker's port."""
    per_port = []
    pattern = re.compile(
        r'^allocsvc_rpcs_total\{(?=[^}]*method="Allocate")[^}]*code="(\w+)"[^}]*\} (\S+)$', re.M
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
    done = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", stdout)
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


def run_h2load(
    h2load: str, target: Target, body: Path, shape: Shape, seconds: float
) -> dict[str, Any]:
    setup = target.setup
    log = target.workdir / "h2load.log"
    log.unlink(missing_ok=True)
    command = [h2load, "-t", "1", "-c", str(shape.connections), "-m", str(shape.streams)]
    command += ["-D", f"{max(1, round(seconds))}", "-d", str(body), "--log-file", str(log)]
    for header in HEADERS:
        command += ["-H", header]
    if shape.rate:
        command += ["--rps", f"{shape.rate / shape.connections:.3f}"]
    command.append(f"http://{setup.target}{PATH}")
    before = rpc_counts(target.metrics_ports) if target.metrics_ports else []
    pids, pg_pids = setup.pids(), _postgres_pids(target.workdir)
    cpu0, pg0, client0 = run._cpu_seconds(pids), run._cpu_seconds(pg_pids), os.times()
    busy0, wall0 = _machine_busy(), time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    busy1, wall = _machine_busy(), time.monotonic() - wall0
    client1 = os.times()
    cpu, pg = run._cpu_seconds(pids) - cpu0, run._cpu_seconds(pg_pids) - pg0
    if done.returncode != 0:
        raise RuntimeError(f"h2load against {setup.name} failed:\n{done.stderr[-2000:]}")
    numbers = _parse(done.stdout)
    latencies, not_200 = _latencies_ms(log)
    count = int(numbers["succeeded"])
    errors = int(numbers["failed"] + numbers["errored"] + numbers["timeout"] + numbers["non_2xx"])
    detail = ""
    if target.metrics_ports:
        per_worker = [
            {c: n - old.get(c, 0) for c, n in new.items()}
            for old, new in zip(before, rpc_counts(target.metrics_ports), strict=True)
        ]
        by_code: dict[str, int] = {}
        for counts in per_worker:
            for c, n in counts.items():
                by_code[c] = by_code.get(c, 0) + n
        not_ok = sum(n for c, n in by_code.items() if c != "OK")
        errors += not_ok
        # Every call h2load saw answered must have been counted by a handler (the server may
        # count a few more: calls in flight when h2load stopped).
        missing = max(0, count - sum(by_code.values()))
        errors += missing
        detail = ", ".join(f"{c} {n:,}" for c, n in sorted(by_code.items()) if n)
        if missing:
            detail += f", {missing:,} answered but not counted"
        if len(per_worker) > 1:
            split = " / ".join(f"{sum(c.values()):,}" for c in per_worker)
            detail += f" (by worker: {split})"
    else:
        # Echo answers the same message every time: every body must be exactly that one
        # (h2load counts bodies of calls cut off at the end of the run too, hence >=).
        data = int(numbers["data_bytes"])
        wrong = data < ECHO_RESPONSE * count or data % ECHO_RESPONSE != 0
        errors += count if wrong else 0
        detail = f"{data // ECHO_RESPONSE:,} bodies of {ECHO_RESPONSE} B"
    if not_200:
        detail += f"; {not_200:,} log rows not HTTP 200"
    client_cpu = (client1.children_user + client1.children_system) - (
        client0.children_user + client0.children_system
    )
    return {
        "shape": shape,
        "seconds": seconds,
        "count": count,
        "errors": errors,
        "detail": detail,
        "rps": numbers["rps"],
        "p50": run._percentile(latencies, 0.50),
        "p95": run._percentile(latencies, 0.95),
        "p99": run._percentile(latencies, 0.99),
        "p999": run._percentile(latencies, 0.999),
        "cpu_us_per_request": cpu / max(count, 1) * 1e6,
        "server_cores": cpu / wall,
        "client_cores": client_cpu / wall,
        "postgres_cores": pg / wall,
        "machine_cores": (busy1 - busy0) / wall,
        "rss_mib": run._rss_kib(setup.pids()) / 1024,
    }


# Plan --------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[Shape]:
    """Concurrencies to find saturation: calls in flight 16, 32, 128 (--quick: 16, 64)."""
    streams = (1, 4) if args.quick else (1, 2, 8)
    return [Shape(CONNECTIONS, s) for s in streams]


def measure(
    h2load: str, target: Target, body: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    name = target.setup.name
    print(f"{name}: warm-up {args.warmup:g} s", file=sys.stderr)
    run_h2load(h2load, target, body, Shape(CONNECTIONS, 2), args.warmup)
    rows = []
    for shape in plan(args):
        print(f"{name}: {shape.label}", file=sys.stderr)
        rows.append(run_h2load(h2load, target, body, shape, args.duration))
    best = max(rows, key=lambda r: r["rps"])
    steady = Shape(CONNECTIONS, STEADY_STREAMS, rate=max(1, int(0.7 * best["rps"])))
    print(f"{name}: {steady.label} for {args.steady:g} s", file=sys.stderr)
    rows.append(run_h2load(h2load, target, body, steady, args.steady))
    return rows


# Report ------------------------------------------------------------------------------------


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [r for r in rows if not r["shape"].rate]
    return max(found, key=lambda r: r["rps"]) if found else None


def _steady(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["shape"].rate), None)


def bars(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    lines = ["| bar (issue 10) | measured | status |", "|---|---:|---|"]

    def row(text: str, value: str, ok: bool | None) -> None:
        status = "(info)" if ok is None else ("met" if ok else "**NOT met**")
        lines.append(f"| {text} | {value} | {status} |")

    w1, echo, w2 = results.get("w1", []), results.get("echo", []), results.get("w2", [])
    u1, ue, u2 = _best(w1), _best(echo), _best(w2)
    if u1 and ue:
        row(
            "unary `Allocate` >= 80% of echo's req/s (best concurrency each)",
            f"{u1['rps'] / ue['rps']:.0%}",
            u1["rps"] >= 0.8 * ue["rps"],
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
        row(
            f"p99 < 5 ms at 70% of saturation, one worker ({s1['shape'].rate:,}/s)",
            f"{s1['p99']:.2f} ms",
            s1["p99"] < 5,
        )
    for name in ("echo", "w1", "mem", "w2"):
        steady = _steady(results.get(name, []))
        if steady:
            row(
                f"  {name} at 70% of its saturation: rate kept (req/s / asked), p99",
                f"{steady['rps'] / steady['shape'].rate:.0%}, {steady['p99']:.2f} ms",
                None,
            )
    for name, rows in (("one worker", w1), ("two workers", w2)):
        steady = _steady(rows)
        if steady:
            short = steady["seconds"] < 60
            row(
                f"zero errors over {steady['seconds']:g} s at 70% of saturation, {name}"
                + (" (--quick: the bar asks 60 s)" if short else ""),
                f"{steady['errors']} in {steady['count']:,}",
                None if short else steady["errors"] == 0,
            )
    if u1 and u2:
        row(
            "`--workers 2` / `--workers 1`, req/s, h2load on the same cores",
            f"{u2['rps'] / u1['rps']:.2f}x",
            u2["rps"] >= 1.6 * u1["rps"],
        )
        per_core = (u2["rps"] / u2["server_cores"]) / (u1["rps"] / u1["server_cores"])
        row(
            "`--workers 2` / `--workers 1`, h2load accounted for: 2 x (req/s per server core) "
            "over 1 x (req/s per server core)",
            f"{2 * per_core:.2f}x",
            2 * per_core >= 1.6,
        )
        row(
            "  cores left to two workers: nproc - h2load - PostgreSQL (server cores used)",
            f"{(os.cpu_count() or 1) - u2['client_cores'] - u2['postgres_cores']:.2f} "
            f"({u2['server_cores']:.2f})",
            None,
        )
    return lines


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, started: str) -> str:
    echo = _best(results.get("echo", []))
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
        "servers and PostgreSQL share these cores, and so may other work (the `machine` "
        "column): ratios within this run matter most.**",
        "",
        f"Warm-up {args.warmup:g} s per setup, then {args.duration:g} s per concurrency "
        f"(h2load `-t 1`, {CONNECTIONS} connections x streams in flight on each), then "
        f"{args.steady:g} s at 70% of the setup's best rate (the same {CONNECTIONS} "
        f"connections, each with `--rps` of 1/{CONNECTIONS} of the rate and {STEADY_STREAMS} "
        "streams). Every call is the same pre-serialized `AllocateRequest` (h2load cannot "
        "vary the body): one user id and an Instagram/iPhone/US context, in a 5-variant "
        "**non-sticky** experiment segmented by source and device, so every call is "
        "allocated anew. Latencies in ms from h2load's per-request log, from the request's "
        "send to the end of its response: a request due while all its connection's streams "
        "are busy waits unlogged, so past saturation latencies are understated (the "
        '"rate kept" rows show when). Errors: h2load\'s failed streams and non-2xx '
        "answers, plus for allocsvc the non-OK codes of `allocsvc_rpcs_total` (allocsvc runs "
        "with `--metrics-port`; every worker's port is read before and after each run) and "
        "answered calls no handler counted; for echo (no metrics) a body of any other size "
        "than its one answer counts all calls of the run as errors. CPU: `server` is the "
        "server's process tree (workers included), `h2load` the client's own, `pg` the "
        "embedded PostgreSQL's tree, `machine` all busy cores of the machine (/proc/stat, "
        "other work included), each as cores = CPU s / wall s; server CPU per call is over "
        "the calls h2load counted. Nothing is pinned. Setups: `echo` (bench/load/echo.py), "
        "`w1` (`allocsvc serve --workers 1`), `w2` (`--workers 2`, SO_REUSEPORT), each on "
        "the embedded PostgreSQL (one database each), and `mem` (`--workers 1 --in-memory`: "
        "no PostgreSQL, so no write-behind; it shows what persistence costs per call).",
        "",
        "| setup | run | req/s | p50 | p95 | p99 | p99.9 | errors | server CPU µs/call "
        "| server cores | h2load cores | pg cores | machine cores | RSS MiB | req/s vs echo "
        "| RPCs counted |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, rows in results.items():
        for r in rows:
            ratio = "-" if name == "echo" or not echo or r["shape"].rate else r["rps"] / echo["rps"]
            lines.append(
                f"| {name} | {r['shape'].label} | {r['rps']:,.0f} | {r['p50']:.2f} "
                f"| {r['p95']:.2f} | {r['p99']:.2f} | {r['p999']:.2f} | {r['errors']} "
                f"| {r['cpu_us_per_request']:,.0f} | {r['server_cores']:.2f} "
                f"| {r['client_cores']:.2f} | {r['postgres_cores']:.2f} "
                f"| {r['machine_cores']:.2f} | {r['rss_mib']:,.0f} "
                f"| {ratio if isinstance(ratio, str) else f'{ratio:.0%}'} | {r['detail']} |"
            )
    lines += [
        "",
        *bars(results, args),
        "",
        "The accounted ratio assumes what a load generator elsewhere would give: each worker "
        "a core of its own at the work per core it showed here (req/s / server cores); it "
        "does not see imbalance between the workers or a worker idle for want of load.",
        "",
    ]
    return "\n".join(lines)


# Main --------------------------------------------------------------------------------------


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
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args()
    args.duration = args.duration or (4.0 if args.quick else 10.0)
    args.warmup = args.warmup or (2.0 if args.quick else 5.0)
    args.steady = args.steady or (10.0 if args.quick else 60.0)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.h2load = find_h2load()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="allocsvc-h2load-") as tmp:
        workdir = Path(tmp)
        body = grpc_body(workdir)
        with run.stores(workdir) as (postgres, _redis_url):
            for name in args.setups.split(","):
                if name == "echo":
                    target = Target(run.start_echo(workdir), [], workdir)
                elif name in ("w1", "w2", "mem"):
                    workers = 2 if name == "w2" else 1
                    first = _metrics_ports(workers)
                    setup = run.start_allocsvc(
                        name,
                        workdir,
                        "" if name == "mem" else run.database(postgres, f"h2load_{name}"),
                        workers=workers,
                        metrics_port=first,
                    )
                    target = Target(setup, list(range(first, first + workers)), workdir)
                else:
                    raise SystemExit(f"unknown setup {name!r}")
                try:
                    if target.setup.real:
                        run._create_experiments(target.setup)
                        run._wait_known(target.setup)
                        _wait_metrics(target.metrics_ports)
                    results[name] = measure(args.h2load, target, body, args)
                finally:
                    target.setup.stop()
    text = report(results, args, started)
    print(text)
    if not args.no_write:
        benchkit.write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
