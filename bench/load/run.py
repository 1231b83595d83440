"""Load harness (issue 10): allocsvc against a bare grpc.aio echo server, driven by ghz.

One command, everything on 127.0.0.1, bounded in count and time:

    python bench/load/run.py            # default run, a few minutes
    python bench/load/run.py --quick    # about a minute

It starts an embedded PostgreSQL (one database per setup) and a redis-server, then one setup at
a time: the echo server (`bench/load/echo.py`), `allocsvc serve --workers 1`, `--workers 2`
(SO_REUSEPORT), and two replicas on one port sharing Redis. Each gets the same ghz runs through
server reflection: unary `Allocate` at fixed concurrencies, `AllocateBatch` at several batch
sizes, durable `RecordConversion`, and unary `Allocate` at a fixed rate of 70% of the setup's
saturation. ghz (benchkit.GHZ_MODULE) is installed with `go install` when it is missing or too old.

For each run: requests/s, allocations/s, latency percentiles (p99.9 from ghz's per-request
details), errors, server CPU per request (CPU of the server's process tree over the run), its
RSS at the end, and the ratio to the echo server's run of the same shape. The table goes to
bench/RESULTS.md, section "Load (issue 10)", with the exact command and the core count.
The load generator shares the machine: its CPU is reported next to the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchkit  # bench/load/benchkit.py
import grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SECTION = "## Load (issue 10)"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
EXPERIMENT = "load-web"
# Not sticky: a batch sent again (ghz repeats one binary message) is allocated anew.
BATCH_EXPERIMENT = "load-batch"
# Users allocated before the conversion runs (cv-0 ...): a conversion run's calls name them in
# turn, from the first again once all were named (each call keeps its own idempotency key).
CONVERSION_USERS = 30_000


# Processes ---------------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def postgres_pids(data_dir: Path | None) -> list[int]:
    """The processes of the PostgreSQL server running on `data_dir` (none when it is None or
    not running)."""
    if data_dir is None:
        return []
    try:
        return _tree(int((data_dir / "postmaster.pid").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return []


def _cpu_seconds(pids: list[int]) -> float:
    return _cpu_seconds_of([f"/proc/{p}/stat" for p in pids])


def _cpu_seconds_of(stat_files: list[str]) -> float:
    total = 0
    for stat in stat_files:
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def _main_thread_cpu_seconds(pids: list[int]) -> float:
    """CPU of the processes' main threads only: a server's event loop, where its Python runs
    (gRPC core's own threads and the completion-queue poller are the others)."""
    return _cpu_seconds_of([f"/proc/{p}/task/{p}/stat" for p in pids])


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE_KIB
        except OSError:
            continue
    return total


@dataclass
class Setup:
    """One server setup under test: its processes, all on one port."""

    name: str
    port: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    real: bool = True

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return [p for proc in self.processes for p in _tree(proc.pid)]

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(setup: Setup, seconds: float = 90) -> None:
    def alive() -> None:
        for proc in setup.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{setup.name}: a process exited ({proc.returncode})")

    benchkit.wait_health(setup.target, time.monotonic() + seconds, alive, every=0.3)


def _spawn(args: list[str], log: Path, **env_vars: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ALLOCSVC_LOG_LEVEL": "WARNING", **env_vars}
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=out, env=env, cwd=ROOT)


def start_echo(workdir: Path, wrap: Sequence[str] = (), start_s: float = 90) -> Setup:
    """`wrap`: a command the server runs under (a profiler), `start_s`: how long it may take
    to serve."""
    setup = Setup("echo", _free_port(), real=False)
    setup.processes.append(
        _spawn(
            [*wrap, sys.executable, str(HERE / "echo.py"), "--port", str(setup.port)],
            workdir / "echo.log",
        )
    )
    _wait_serving(setup, start_s)
    return setup


def server_env(
    event_loop: str, connection_age: float | None = None, max_unexpanded: int | None = None
) -> dict[str, str]:
    """The settings `start_allocsvc` gives its servers, as environment variables."""
    env = {"ALLOCSVC_EVENT_LOOP": event_loop}
    if connection_age is not None:
        env["ALLOCSVC_MAX_CONNECTION_AGE"] = f"{connection_age:g}"
    if max_unexpanded is not None:
        env["ALLOCSVC_BACKPRESSURE__MAX_UNEXPANDED_ASSIGNMENTS"] = str(max_unexpanded)
    return env


def start_allocsvc(
    name: str,
    workdir: Path,
    dsn: str,
    *,
    workers: int = 1,
    replicas: int = 1,
    redis: str = "",
    event_loop: str = "uvloop",
    metrics_port: int | None = None,
    connection_age: float | None = None,
    max_unexpanded: int | None = None,
    wrap: Sequence[str] = (),
    start_s: float = 90,
    settings: Mapping[str, str] | None = None,
) -> Setup:
    """`dsn` "": serve from memory only (`--in-memory`: no PostgreSQL, no write-behind).
    `metrics_port`: serve Prometheus metrics there (each worker on the next port up).
    `connection_age`: the servers' `max_connection_age`, `max_unexpanded`: their
    `backpressure.max_unexpanded_assignments` (None: their defaults). `wrap`: a command each
    server runs under (a profiler), `start_s`: how long each may take to serve. `settings`:
    more of the servers' settings, as `ALLOCSVC_` environment variables."""
    env = {**server_env(event_loop, connection_age, max_unexpanded), **(settings or {})}
    setup = Setup(name, _free_port())
    for i in range(replicas):
        args = [*wrap, sys.executable, "-m", "allocsvc", "serve", "--port", str(setup.port)]
        args += ["--postgres-dsn", dsn] if dsn else ["--in-memory"]
        args += ["--workers", str(workers), "--seed", str(7 + i)]
        if redis:
            args += ["--redis-url", redis]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port + i * workers)]
        if i > 0:
            args.append("--no-migrate")
        log = workdir / f"{name}-{i}.log"
        setup.processes.append(_spawn(args, log, **env))
        try:
            _wait_serving(setup, start_s)
        except RuntimeError as exc:
            setup.stop()
            raise RuntimeError(f"{exc}\n{log.read_text()[-3000:]}") from None
    return setup


def _create_experiments(setup: Setup) -> None:
    with grpc.insecure_channel(setup.target) as channel:
        admin = pb_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        for key in (EXPERIMENT, BATCH_EXPERIMENT):
            admin.CreateExperiment(
                pb.CreateExperimentRequest(
                    experiment=pb.Experiment(
                        id=key,
                        name=key,
                        sticky=key == EXPERIMENT,
                        status=pb.EXPERIMENT_STATUS_RUNNING,
                        variants=[
                            pb.Variant(id=v, name=v, payload_json=f'{{"label": "{v}"}}')
                            for v in ("A", "B", "C", "D", "E")
                        ],
                        segmentation=benchkit.manual_segmentation(),
                    )
                ),
                timeout=30,
            )


def _wait_known(setup: Setup, seconds: float = 60) -> None:
    """Until every process knows the experiments (the others load them from the store)."""
    deadline = time.monotonic() + seconds
    while True:
        missing = 0
        for probe in range(8):
            with grpc.insecure_channel(setup.target) as channel:
                allocator = pb_grpc.AllocatorStub(channel)  # type: ignore[no-untyped-call]
                for key in (EXPERIMENT, BATCH_EXPERIMENT):
                    try:
                        allocator.Allocate(
                            pb.AllocateRequest(experiment_id=key, user_id=f"probe-{probe}"),
                            timeout=10,
                        )
                    except grpc.RpcError:
                        missing += 1
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{setup.name}: experiments still unknown after {seconds} s")
        time.sleep(1)


def _preallocate(setup: Setup, users: int) -> None:
    """Assignments for the conversion runs (users cv-0 ... cv-{users - 1})."""
    with grpc.insecure_channel(
        setup.target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        allocator = pb_grpc.AllocatorStub(channel)  # type: ignore[no-untyped-call]
        for start in range(0, users, 1000):
            reply = allocator.AllocateBatch(
                pb.AllocateBatchRequest(
                    requests=[
                        pb.AllocateRequest(experiment_id=EXPERIMENT, user_id=f"cv-{i}")
                        for i in range(start, min(users, start + 1000))
                    ]
                ),
                timeout=120,
            )
            errors = [r for r in reply.results if r.WhichOneof("outcome") == "error"]
            if errors:
                raise RuntimeError(f"{setup.name}: pre-allocation failed: {errors[0]}")


# ghz ---------------------------------------------------------------------------------------


def find_ghz() -> str:
    found = benchkit.find_ghz(install=True)
    if found is None:
        raise RuntimeError("ghz is missing and there is no Go toolchain to install it with")
    return found


@dataclass(frozen=True)
class Shape:
    """One ghz run: a method, its concurrency, its batch size or conversion, its rate."""

    kind: str  # "unary", "batch", "conversion"
    concurrency: int
    batch: int = 1
    rps: int = 0  # 0: as fast as possible

    @property
    def label(self) -> str:
        if self.kind == "batch":
            what = f"`AllocateBatch` x{self.batch:,}"
        elif self.kind == "conversion":
            what = "durable `RecordConversion`"
        else:
            what = "`Allocate`"
        rate = f" @ {self.rps:,}/s" if self.rps else ""
        return f"{what}, c={self.concurrency}{rate}"

    @property
    def key(self) -> tuple[str, int, int, bool]:
        return (self.kind, self.concurrency, self.batch, self.rps > 0)


def _data(shape: Shape, run: str, users: int = CONVERSION_USERS) -> Any:
    """JSON call data (ghz fills in the request number), or for batches a serialized message:
    ghz builds a templated 1,000-item batch far slower than the servers answer it. A
    conversion names one of the `users` allocated first (`_preallocate`), in turn: a run of
    more calls than users would otherwise convert users no one allocated (NOT_FOUND)."""
    n = "{{.RequestNumber}}"
    if shape.kind == "conversion":
        user = f"cv-{{{{mod .RequestNumber {users}}}}}"  # ghz has sprig's functions
        return {"experiment_id": EXPERIMENT, "user_id": user, "idempotency_key": f"{run}-{n}"}
    if shape.kind == "unary":
        return {"experiment_id": EXPERIMENT, "context": benchkit.CONTEXT, "user_id": f"{run}-{n}"}
    return pb.AllocateBatchRequest(
        requests=[
            pb.AllocateRequest(
                experiment_id=BATCH_EXPERIMENT, user_id=f"{run}-{i}", context=benchkit.CONTEXT
            )
            for i in range(shape.batch)
        ]
    ).SerializeToString()


def _percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def run_ghz(
    ghz: str, setup: Setup, shape: Shape, seconds: float, run: str, users: int = CONVERSION_USERS
) -> dict[str, Any]:
    """`shape` for `seconds`; conversions name the first `users` users (`_data`)."""
    method = {"unary": "Allocate", "batch": "AllocateBatch", "conversion": "RecordConversion"}
    payload = _data(shape, run, users)
    binary = isinstance(payload, bytes)
    with tempfile.NamedTemporaryFile("wb", suffix=".bin", delete=False) as data:
        data.write(payload if binary else json.dumps(payload).encode())
    command = [
        ghz, "--insecure",
        "--call", f"allocsvc.v1.Allocator/{method[shape.kind]}",
        "--binary-file" if binary else "--data-file", data.name,
        "-c", str(shape.concurrency),
        "--connections", str(min(4, shape.concurrency)),
        "-z", f"{seconds}s",
        "--duration-stop", "wait",
        "--max-recv-message-size", "64MB",
        "--max-send-message-size", "64MB",
        "-O", "json",
    ]  # fmt: skip
    if shape.rps:
        command += ["--rps", str(shape.rps)]
    command.append(setup.target)
    pids = setup.pids()
    cpu0, client0 = _cpu_seconds(pids), os.times()
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 180)
    client1 = os.times()
    cpu = _cpu_seconds(pids) - cpu0
    Path(data.name).unlink()
    if done.returncode != 0 and not done.stdout.strip():
        raise RuntimeError(f"ghz against {setup.name} failed:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    details = report.get("details") or []
    ok_ms = sorted(d["latency"] / 1e6 for d in details if d.get("status") == "OK")
    codes = {k: v for k, v in (report.get("statusCodeDistribution") or {}).items() if k != "OK"}
    errors = sum(codes.values())
    wall = report["total"] / 1e9
    count = report["count"]
    client_cpu = (client1.children_user + client1.children_system) - (
        client0.children_user + client0.children_system
    )
    return {
        "shape": shape,
        "count": count,
        "errors": errors,
        "error_codes": codes,
        "rps": count / wall,
        "items_per_s": count * shape.batch / wall,
        "p50": _percentile(ok_ms, 0.50),
        "p95": _percentile(ok_ms, 0.95),
        "p99": _percentile(ok_ms, 0.99),
        "p999": _percentile(ok_ms, 0.999),
        "cpu_us_per_request": cpu / max(count, 1) * 1e6,
        "server_cores": cpu / wall,
        "client_cores": client_cpu / wall,
        "rss_mib": _rss_kib(setup.pids()) / 1024,
    }


def _errors(row: dict[str, Any]) -> str:
    """A run's non-OK answers, with their gRPC codes when there are any: "501 (Unavailable 501)"."""
    codes = ", ".join(f"{code} {n:,}" for code, n in sorted(row["error_codes"].items()))
    return f"{row['errors']:,} ({codes})" if codes else f"{row['errors']:,}"


# Stores ------------------------------------------------------------------------------------


@contextmanager
def stores(workdir: Path) -> Iterator[tuple[Any, str]]:
    """An embedded PostgreSQL and a redis-server for the run."""
    from allocsvc.store.embedded import EmbeddedPostgres

    postgres = EmbeddedPostgres(workdir / "postgres")
    postgres.start()
    redis_port = _free_port()
    redis_args = ["--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
    redis = subprocess.Popen(
        ["redis-server", *redis_args, "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield postgres, f"redis://127.0.0.1:{redis_port}/0"
    finally:
        redis.terminate()
        redis.wait(timeout=10)
        postgres.stop()


def database(postgres: Any, name: str) -> str:
    """A fresh database on the embedded server; its DSN."""
    import asyncpg

    base = postgres.dsn

    async def create() -> None:
        connection = await asyncpg.connect(base)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    asyncio.run(create())
    return re.sub(r"(postgres(?:ql)?://[^/]*/)[^?]*", lambda m: m.group(1) + name, base, count=1)


# Plan and report ---------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[Shape]:
    """The runs of a setup, in the order `measure` takes them (batches last: see there)."""
    if args.quick:
        return [
            Shape("unary", 32),
            Shape("conversion", 32),
            Shape("batch", 2, 100),
            Shape("batch", 2, 1000),
        ]
    return [
        Shape("unary", 8),
        Shape("unary", 32),
        Shape("unary", 128),
        Shape("conversion", 32),
        Shape("conversion", 128),
        Shape("batch", 4, 10),
        Shape("batch", 4, 100),
        Shape("batch", 2, 1000),
        Shape("batch", 4, 1000),
    ]


def measure(
    ghz: str, setup: Setup, shapes: list[Shape], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The unary shapes, then unary at a fixed 70% of the best of them, then the others in
    order (`plan`: conversions, then batches). Batches come last: the durable server writes a
    large flush of their assignments as blocks and expands those into rows once no block came
    for a second, tens of seconds of PostgreSQL's CPU for a run's millions, and a run taken
    meanwhile measures that too (bench/RESULTS.md, item 61: conversions 2,076/s after the
    batch runs against 3,033/s before them)."""
    unary = [s for s in shapes if s.kind == "unary"]
    others = [s for s in shapes if s.kind != "unary"]

    def take(n: int, shape: Shape) -> dict[str, Any]:
        print(f"{setup.name}: {shape.label}", file=sys.stderr)
        run_ghz(ghz, setup, shape, args.warmup, f"{setup.name}-w{n}")
        return run_ghz(ghz, setup, shape, args.duration, f"{setup.name}-r{n}")

    rows = [take(n, shape) for n, shape in enumerate(unary)]
    best = max(rows, key=lambda r: r["rps"])
    steady = Shape("unary", best["shape"].concurrency, rps=max(1, int(0.7 * best["rps"])))
    print(f"{setup.name}: {steady.label} for {args.steady} s", file=sys.stderr)
    rows.append(run_ghz(ghz, setup, steady, args.steady, f"{setup.name}-steady"))
    return rows + [take(n, shape) for n, shape in enumerate(others, start=len(unary))]


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, started: str) -> str:
    echo = {r["shape"].key: r for r in results.get("echo", [])}
    lines = [
        SECTION,
        "",
        f"Command: `cd {ROOT} && {' '.join(['python', *sys.argv])}`"
        " (`make bench-load` runs the default).",
        "",
        f"Date: {started}. Machine: {benchkit.cpu_model()}, nproc {os.cpu_count()}, Python "
        f"{sys.version.split()[0]}, grpcio {grpc.__version__}; load average at the end: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}. **ghz, the servers, PostgreSQL and "
        "Redis share these cores, and other work shared the machine: figures are noisy; ratios "
        "within this run matter most.**",
        "",
        f"Each row: {args.warmup:g} s warm-up, then {args.duration:g} s measured (the fixed-rate "
        f"row {args.steady:g} s at 70% of the setup's best unary rate), in the order shown: "
        "batches last, since the durable server expands their assignments from blocks into "
        "rows in the background for tens of seconds after. Each unary call has a "
        "new user id, an Instagram/iPhone/US context and a 5-variant sticky experiment "
        "segmented by source and device; batches are one serialized message sent again and "
        "again (ghz templating a 1,000-item batch is slower than the servers), its items in a "
        "non-sticky experiment of the same shape, so every item is allocated anew; "
        f"conversions are by experiment and user, of the {CONVERSION_USERS:,} users "
        "allocated first in turn, each with a new idempotency key, answered after their group "
        "commit. Errors are the non-OK answers, with ghz's count per gRPC "
        "code. Latencies in ms over OK answers "
        "(p99.9 from ghz's per-request details). Server CPU is the CPU time of the server's "
        "process tree (workers included, PostgreSQL and Redis not) over the run, per request; "
        "cores = CPU s / wall s. RSS is the tree's resident memory after the run. Setups: "
        "`echo` (bench/load/echo.py), `w1` (`allocsvc serve --workers 1`), `w2` (`--workers 2`, "
        "SO_REUSEPORT, no Redis: no conversion rows, since workers share assignments only "
        "through Redis), `redis2` (two `allocsvc serve` processes on one port sharing Redis and "
        "PostgreSQL). All setups use the embedded PostgreSQL (one database each); the "
        "fixed-rate row runs at the concurrency of the best unary row.",
        "",
        "| setup | run | req/s | allocations/s | p50 | p95 | p99 | p99.9 | errors "
        "| server CPU µs/req | server cores | ghz cores | RSS MiB | req/s vs echo |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():
        for r in rows:
            shape: Shape = r["shape"]
            base = echo.get(shape.key) if name != "echo" else None
            items = "-" if shape.kind == "conversion" else f"{r['items_per_s']:,.0f}"
            lines.append(
                f"| {name} | {shape.label} | {r['rps']:,.0f} | {items} | {r['p50']:.2f} "
                f"| {r['p95']:.2f} | {r['p99']:.2f} | {r['p999']:.2f} | {_errors(r)} "
                f"| {r['cpu_us_per_request']:,.0f} | {r['server_cores']:.2f} "
                f"| {r['client_cores']:.2f} | {r['rss_mib']:,.0f} "
                f"| {_fmt_ratio(r['rps'] / base['rps'] if base else None)} |"
            )
    lines += ["", *bars(results), ""]
    return "\n".join(lines)


def _best(rows: list[dict[str, Any]], kind: str, batch: int = 1) -> dict[str, Any] | None:
    found = [
        r
        for r in rows
        if r["shape"].kind == kind and r["shape"].batch == batch and not r["shape"].rps
    ]
    return max(found, key=lambda r: r["rps"]) if found else None


def bars(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| bar (issue 10) | measured | status |", "|---|---:|---|"]

    def row(text: str, value: str, ok: bool | None) -> None:
        status = "(info)" if ok is None else ("met" if ok else "**NOT met**")
        lines.append(f"| {text} | {value} | {status} |")

    w1, echo = results.get("w1", []), results.get("echo", [])
    u1, ue = _best(w1, "unary"), _best(echo, "unary")
    if u1 and ue:
        row(
            "unary `Allocate` >= 80% of echo (best concurrency each)",
            f"{u1['rps'] / ue['rps']:.0%}",
            u1["rps"] >= 0.8 * ue["rps"],
        )
        cpu = u1["cpu_us_per_request"], ue["cpu_us_per_request"]
        row(
            "allocation work per call (server CPU µs over echo's)",
            f"{cpu[0] - cpu[1]:,.0f} of {cpu[0]:,.0f}",
            None,
        )
    steady = next((r for r in w1 if r["shape"].rps), None)
    if steady:
        row(
            f"p99 < 5 ms at 70% of saturation ({steady['shape'].rps:,}/s)",
            f"{steady['p99']:.2f} ms",
            steady["p99"] < 5,
        )
        row(
            "zero errors at 70% of saturation",
            f"{steady['errors']} in {steady['count']:,}",
            steady["errors"] == 0,
        )
    b1 = _best(w1, "batch", 1000)
    if b1:
        row(
            "`AllocateBatch` x1,000 >= 1M allocations/s, one worker",
            f"{b1['items_per_s']:,.0f}/s",
            b1["items_per_s"] >= 1e6,
        )
    c1 = _best(w1, "conversion")
    if c1 and u1:
        row(
            "durable `RecordConversion` >= 50% of unary `Allocate`",
            f"{c1['rps'] / u1['rps']:.0%}",
            c1["rps"] >= 0.5 * u1["rps"],
        )
    u2 = _best(results.get("w2", []), "unary")
    if u1 and u2:
        row(
            "`--workers 2` / `--workers 1`, unary req/s (ghz on the same 2 cores)",
            f"{u2['rps'] / u1['rps']:.2f}x",
            u2["rps"] >= 1.6 * u1["rps"],
        )
        per_core = (u2["rps"] / u2["server_cores"]) / (u1["rps"] / u1["server_cores"])
        row("  same, per server core used (req/s / server cores)", f"{per_core:.2f}", None)
    ur = _best(results.get("redis2", []), "unary")
    if u1 and ur:
        row(
            "two replicas sharing Redis / one worker, unary req/s",
            f"{ur['rps'] / u1['rps']:.2f}x",
            None,
        )
    return lines


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, so every server, the embedded PostgreSQL and redis-server
    this run started are stopped by the `finally` blocks (the default action killed only us)."""
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (~1 minute)")
    parser.add_argument("--duration", type=float, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per run")
    parser.add_argument("--steady", type=float, help="seconds of the fixed-rate run")
    parser.add_argument(
        "--setups",
        default="echo,w1,w2,redis2",
        help="comma-separated: echo, w1, w2, redis2 (two replicas sharing Redis), w1-asyncio "
        "(w1 on the asyncio event loop instead of uvloop)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args()
    args.duration = args.duration or (4.0 if args.quick else 8.0)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)
    args.steady = args.steady or (5.0 if args.quick else 20.0)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    ghz = find_ghz()
    shapes = plan(args)
    wanted = args.setups.split(",")
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="allocsvc-load-") as tmp:
        workdir = Path(tmp)
        with stores(workdir) as (postgres, redis_url):
            for name in wanted:
                if name == "echo":
                    setup = start_echo(workdir)
                else:
                    dsn = database(postgres, f"load_{name}")
                    setup = start_allocsvc(
                        name,
                        workdir,
                        dsn,
                        workers=2 if name == "w2" else 1,
                        replicas=2 if name == "redis2" else 1,
                        redis=redis_url if name == "redis2" else "",
                        event_loop="asyncio" if name == "w1-asyncio" else "uvloop",
                    )
                try:
                    if setup.real:
                        _create_experiments(setup)
                        _wait_known(setup)
                        _preallocate(setup, CONVERSION_USERS)
                    # Workers without Redis share no assignments: a conversion may reach a
                    # worker that does not know its user.
                    own = [s for s in shapes if name != "w2" or s.kind != "conversion"]
                    results[name] = measure(ghz, setup, own, args)
                finally:
                    setup.stop()
    text = report(results, args, started)
    print(text)
    if not args.no_write:
        benchkit.write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
