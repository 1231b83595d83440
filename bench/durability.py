"""Durable conversions, write-behind lag and memory of the counters (issue 4).

In one run, against one `python -m allocsvc serve --postgres-dsn ...` process on 127.0.0.1
(PostgreSQL: --postgres-dsn, or an embedded one started here in a temporary directory):

(a) `RecordConversion` with K calls in flight: each call waits for the group-commit transaction
    that stores the conversion and increments its counters at every level of its path;
(b) unary `Allocate` with the same client and K, rounds alternating with (a); the bar is
    conversions/s >= 0.5 x allocations/s;
(c) write-behind lag under Allocate load: for sampled allocations, the time from the answer to
    the assignment row being visible in PostgreSQL (polled every few ms from here);
(d) memory: VmRSS/VmHWM of a server that loaded one million segment-variant counters (one
    experiment created through the API, 200,000 segment hashes x 5 variants inserted into
    segment_variant_state by SQL), next to an empty server's.

The client (grpc.aio, one channel, one process) shares the machine's cores with the server and
PostgreSQL. Prints a markdown section and, unless --no-write, puts it into bench/RESULTS.md as
"Durability and shared state (issue 4)" (its own section only; others are left as they are).

    python bench/durability.py --duration 8 --rounds 2 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from load import benchkit  # bench/load/benchkit.py

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc
from allocsvc.core import key_hash

SECTION = "## Durability and shared state (issue 4)"
START_TIMEOUT_S = 120.0
EXPERIMENT = "bench-durable"
BAR = 0.5


# Server processes and databases --------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    started_s: float  # spawn to "serving"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) from /proc/<pid>/status, in KiB."""
        found = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
        return found

    def log_entry(self, msg: str) -> dict[str, Any]:
        return benchkit.log_entry(self.log, msg)


def start_server(dsn: str, workdir: Path, name: str) -> Server:
    log = workdir / f"{name}.log"
    args = [sys.executable, "-m", "allocsvc", "serve", "--host", "127.0.0.1", "--port", "0"]
    args += ["--postgres-dsn", dsn, "--seed", "7"]
    t0 = time.monotonic()
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
    deadline = t0 + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read_text()}")
        server = Server(process, 0, log, 0.0)
        serving = server.log_entry("serving")
        if serving:
            server.port = int(serving["port"])
            server.started_s = time.monotonic() - t0
            benchkit.wait_health(server.target, deadline)
            return server
        time.sleep(0.02)
    process.kill()
    process.wait()
    raise RuntimeError(f"{name} did not start within {START_TIMEOUT_S} s:\n{log.read_text()}")


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


async def admin_sql(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


class Databases:
    """Fresh databases on one server; all dropped at the end."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.names: list[str] = []

    def create(self) -> str:
        name = f"bench_{uuid.uuid4().hex[:12]}"
        asyncio.run(admin_sql(self.dsn, f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        return with_database(self.dsn, name)

    def drop_all(self) -> None:
        for name in self.names:
            asyncio.run(admin_sql(self.dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def create_experiment(server: Server, key: str, variants: int) -> None:
    experiment = pb.Experiment(
        id=key,
        name=key,
        status=pb.EXPERIMENT_STATUS_RUNNING,
        variants=[pb.Variant(id=f"v{i}", name=f"v{i}") for i in range(variants)],
        segmentation=benchkit.manual_segmentation(),
    )
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.AdminStub(channel).CreateExperiment(
            pb.CreateExperimentRequest(experiment=experiment), timeout=30
        )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Load ----------------------------------------------------------------------------------------


@dataclass
class Rate:
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu: float  # cores used by the server process

    @property
    def per_s(self) -> float:
        return self.calls / self.seconds


class Client:
    """K concurrent callers on one grpc.aio channel."""

    def __init__(self, target: str, concurrency: int, server_pid: int) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.AllocatorStub(self.channel)
        self.concurrency = concurrency
        self.server_pid = server_pid
        self.assignments: list[str] = []
        self._users = 0
        self._keys = 0
        self.acked = 0  # conversions answered OK, warm-ups included

    async def allocate(self, user_prefix: str = "u") -> pb.AllocateResponse:
        self._users += 1
        reply: pb.AllocateResponse = await self.stub.Allocate(
            pb.AllocateRequest(
                experiment_id=EXPERIMENT,
                user_id=f"{user_prefix}{self._users}",
                context=benchkit.CONTEXT,
            ),
            timeout=30,
        )
        return reply

    async def allocate_call(self) -> None:
        reply = await self.allocate()
        if len(self.assignments) < 200_000:
            self.assignments.append(reply.assignment_id)

    async def convert_call(self) -> None:
        self._keys += 1
        assignment_id = self.assignments[self._keys % len(self.assignments)]
        reply = await self.stub.RecordConversion(
            pb.RecordConversionRequest(
                assignment_id=assignment_id, idempotency_key=f"k{self._keys}", value=1.0
            ),
            timeout=30,
        )
        if not reply.counted:
            raise RuntimeError(f"conversion {self._keys} not counted")
        self.acked += 1

    async def run(
        self, call: Callable[[], Awaitable[None]], warmup: float, duration: float
    ) -> Rate:
        latencies: list[float] = []
        state = {"measuring": False, "stop": False}

        async def worker() -> None:
            while not state["stop"]:
                start = time.perf_counter()
                await call()
                if state["measuring"]:
                    latencies.append(time.perf_counter() - start)

        tasks = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        await asyncio.sleep(warmup)
        state["measuring"] = True
        cpu0, t0 = cpu_seconds(self.server_pid), time.perf_counter()
        await asyncio.sleep(duration)
        state["measuring"] = False
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(self.server_pid) - cpu0
        state["stop"] = True
        await asyncio.gather(*tasks)
        latencies.sort()
        return Rate(
            calls=len(latencies),
            seconds=elapsed,
            p50_ms=1000 * latencies[len(latencies) // 2],
            p99_ms=1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            server_cpu=cpu / elapsed,
        )


async def write_behind_lag(
    client: Client, dsn: str, duration: float, every_s: float
) -> tuple[Rate, list[float]]:
    """Allocate load from K-1 callers; every `every_s` one more allocation is sampled and the
    time until its assignment row is visible in PostgreSQL is measured (polled every 5 ms)."""
    pending: dict[str, float] = {}
    lags: list[float] = []
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            reply = await client.allocate("lag-")
            pending[reply.assignment_id] = time.perf_counter()
            await asyncio.sleep(every_s)

    async def poller() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            while not done.is_set() or pending:
                if pending:
                    rows = await conn.fetch(
                        "SELECT id FROM assignments WHERE id = ANY($1::text[])", list(pending)
                    )
                    now = time.perf_counter()
                    for row in rows:
                        lags.append(1000 * (now - pending.pop(row["id"])))
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    client.concurrency -= 1
    tasks = [asyncio.create_task(sampler()), asyncio.create_task(poller())]
    rate = await client.run(client.allocate_call, 1.0, duration)
    done.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    client.concurrency += 1
    return rate, lags


async def throughput(args: argparse.Namespace, server: Server, dsn: str) -> dict[str, Any]:
    client = Client(server.target, args.concurrency, server.process.pid)
    await client.channel.channel_ready()
    allocations: list[Rate] = []
    conversions: list[Rate] = []
    for _ in range(args.rounds):
        allocations.append(await client.run(client.allocate_call, args.warmup, args.duration))
        conversions.append(await client.run(client.convert_call, args.warmup, args.duration))
    lag_rate, lags = await write_behind_lag(client, dsn, args.duration, args.lag_every)
    await client.channel.close()
    return {
        "acked": client.acked,
        "allocations": allocations,
        "conversions": conversions,
        "lag_rate": lag_rate,
        "lags": sorted(lags),
    }


async def stored_conversions(dsn: str) -> tuple[int, int]:
    """Rows in `conversions`, and the conversions counted in the global segment."""
    global_hash = key_hash("")
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM conversions")
        counted = await conn.fetchval(
            "SELECT coalesce(sum(conversions), 0) FROM segment_variant_state"
            " WHERE segment_hash = $1",
            global_hash - (1 << 64) if global_hash >= 1 << 63 else global_hash,
        )
    finally:
        await conn.close()
    return int(rows), int(counted)


# Memory ---------------------------------------------------------------------------------------


async def insert_counters(dsn: str, key: str, segments: int, variants: int) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        experiment_id = await conn.fetchval("SELECT id FROM experiments WHERE key = $1", key)
        # Spread the hashes over the whole signed 64-bit range, like xxh3 values.
        await conn.execute(
            "INSERT INTO segment_variant_state"
            " (experiment_id, segment_hash, variant, allocations, conversions, value_sum)"
            " SELECT $1, hashtextextended(s::text, 42), v, 1000 + s % 97, s % 31, (s % 31) * 2.5"
            " FROM generate_series(1, $2::int) AS s, generate_series(0, $3::int - 1) AS v",
            experiment_id,
            segments,
            variants,
        )
        count: int = await conn.fetchval(
            "SELECT count(*) FROM segment_variant_state WHERE experiment_id = $1", experiment_id
        )
    finally:
        await conn.close()
    return count


def memory(args: argparse.Namespace, databases: Databases, workdir: Path) -> dict[str, Any]:
    empty = start_server(databases.create(), workdir, "empty")
    time.sleep(args.settle)
    empty_kib = empty.memory_kib()
    empty_start = empty.started_s
    empty.stop()

    dsn = databases.create()
    creator = start_server(dsn, workdir, "creator")
    create_experiment(creator, "bench-memory", args.variants)
    creator.stop()
    t0 = time.monotonic()
    counters = asyncio.run(insert_counters(dsn, "bench-memory", args.segments, args.variants))
    insert_s = time.monotonic() - t0
    loaded = start_server(dsn, workdir, "loaded")
    time.sleep(args.settle)
    loaded_kib = loaded.memory_kib()
    state = loaded.log_entry("state loaded")
    loaded_start = loaded.started_s
    loaded.stop()
    return {
        "empty": empty_kib,
        "empty_start_s": empty_start,
        "loaded": loaded_kib,
        "loaded_start_s": loaded_start,
        "counters": counters,
        "logged_counters": state.get("counters"),
        "insert_s": insert_s,
    }


# Report -----------------------------------------------------------------------------------------


def combine(rates: list[Rate]) -> dict[str, Any]:
    seconds = sum(r.seconds for r in rates)
    return {
        "per_s": sum(r.calls for r in rates) / seconds,
        "each": [r.per_s for r in rates],
        "p50_ms": statistics.median(r.p50_ms for r in rates),
        "p99_ms": statistics.median(r.p99_ms for r in rates),
        "server_cpu": statistics.mean(r.server_cpu for r in rates),
    }


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def report(
    args: argparse.Namespace,
    command: str,
    postgres: str,
    load: dict[str, Any],
    mem: dict[str, Any] | None,
    checks: dict[str, Any],
) -> str:
    alloc, conv = combine(load["allocations"]), combine(load["conversions"])
    ratio = conv["per_s"] / alloc["per_s"]
    lag_rate, lags = load["lag_rate"], load["lags"]
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Machine: {benchkit.machine()}; "
        f"load average (1, 5, 15 min) at the start: {args.load_at_start}, at the end: "
        f"{load_average()} (other work may have shared the machine).",
        "",
        f"One `allocsvc serve --postgres-dsn` process on {postgres}. **The client (one grpc.aio "
        f"process, {args.concurrency} calls in flight on one channel), the server and PostgreSQL "
        f"share the same {os.cpu_count()} cores.** Experiment: 2 variants, segmented by source "
        "and device, so every conversion increments counters at 3 levels of its path in its "
        "transaction. Each `Allocate` has a new user id (no sticky shortcut); each "
        "`RecordConversion` has a new idempotency key and is answered only after its group-commit "
        f"transaction committed. {args.warmup:g} s warm-up, {args.duration:g} s measured, "
        f"{args.rounds} round(s) each, alternating. Server CPU is cores used by the server "
        "process (CPU s / wall s).",
        "",
        "| measurement | calls/s (each round) | p50 ms | p99 ms | server CPU |",
        "|---|---:|---:|---:|---:|",
        f"| (b) unary `Allocate` | **{alloc['per_s']:,.0f}** "
        f"({', '.join(f'{x:,.0f}' for x in alloc['each'])}) | {alloc['p50_ms']:.2f} "
        f"| {alloc['p99_ms']:.2f} | {alloc['server_cpu']:.2f} |",
        f"| (a) durable `RecordConversion` | **{conv['per_s']:,.0f}** "
        f"({', '.join(f'{x:,.0f}' for x in conv['each'])}) | {conv['p50_ms']:.2f} "
        f"| {conv['p99_ms']:.2f} | {conv['server_cpu']:.2f} |",
        f"| (c) `Allocate` while sampling the write-behind lag | {lag_rate.per_s:,.0f} "
        f"| {lag_rate.p50_ms:.2f} | {lag_rate.p99_ms:.2f} | {lag_rate.server_cpu:.2f} |",
        "",
        "| result | measured | bar | status |",
        "|---|---:|---:|---|",
        f"| conversions/s / allocations/s | {ratio:.2f} | >= {BAR} "
        f"| {'met' if ratio >= BAR else '**NOT met**'} |",
        f"| (c) write-behind lag, Allocate answer -> assignment row visible, {len(lags)} "
        f"samples: p50 / p90 / p99 / max | {percentile(lags, 0.5):.0f} / "
        f"{percentile(lags, 0.9):.0f} / {percentile(lags, 0.99):.0f} / {lags[-1]:.0f} ms "
        "| (flush every 100 ms) | - |",
        "| conversions acknowledged = rows in `conversions` = counted in the global segment "
        f"| {checks['acked']:,} = {checks['rows']:,} = {checks['global']:,} | equal | "
        f"{'met' if checks['rows'] == checks['global'] == checks['acked'] else '**NOT met**'} |",
    ]
    if mem is not None:
        empty, loaded = mem["empty"], mem["loaded"]
        extra = (loaded["VmRSS"] - empty["VmRSS"]) * 1024
        lines += [
            "",
            f"(d) Memory, /proc/<pid>/status {args.settle:g} s after 'serving' (KiB = 1024 B):",
            "",
            "| server | counters loaded | start to serving | VmRSS | VmHWM (peak) |",
            "|---|---:|---:|---:|---:|",
            f"| empty database | 0 | {mem['empty_start_s']:.1f} s | {empty['VmRSS']:,} KiB "
            f"| {empty['VmHWM']:,} KiB |",
            f"| {args.segments:,} segments x {args.variants} variants | "
            f"{mem['logged_counters']:,} | {mem['loaded_start_s']:.1f} s "
            f"| {loaded['VmRSS']:,} KiB | {loaded['VmHWM']:,} KiB |",
            "",
            f"The counters cost {extra / 2**20:,.0f} MiB of resident memory over the empty server, "
            f"{extra / mem['counters']:.0f} B per (segment, variant) counter "
            f"({mem['counters']:,} rows inserted by SQL in {mem['insert_s']:.1f} s). The peak "
            "includes the rows as Python objects during loading.",
        ]
    return "\n".join(lines) + "\n"


# Main -------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--postgres-dsn", help="server to create databases on (default: embedded)")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run")
    p.add_argument("--rounds", type=int, default=2, help="Allocate/RecordConversion rounds")
    p.add_argument("--concurrency", type=int, default=64, help="calls in flight")
    p.add_argument("--lag-every", type=float, default=0.02, help="seconds between lag samples")
    p.add_argument("--segments", type=int, default=200_000, help="segment hashes for (d)")
    p.add_argument("--variants", type=int, default=5, help="variants for (d)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after serving to read RSS")
    p.add_argument("--skip-memory", action="store_true", help="leave out (d)")
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    return p


def main() -> int:
    args = parser().parse_args()
    args.load_at_start = load_average()
    command = "cd /work/main && " + shlex.join(
        ["/work/venv/bin/python", "bench/durability.py", *sys.argv[1:]]
    )
    with tempfile.TemporaryDirectory(prefix="allocsvc-durability-") as tmp:
        workdir = Path(tmp)
        embedded = None
        if args.postgres_dsn:
            base, postgres = args.postgres_dsn, "the PostgreSQL given by --postgres-dsn"
        else:
            from allocsvc.store import EmbeddedPostgres

            embedded = EmbeddedPostgres(workdir / "postgres")
            base = embedded.start()
            postgres = "an embedded PostgreSQL (pgserver, unix socket, default settings)"
        databases = Databases(base)
        try:
            dsn = databases.create()
            server = start_server(dsn, workdir, "server")
            try:
                create_experiment(server, EXPERIMENT, 2)
                load = asyncio.run(throughput(args, server, dsn))
            finally:
                code = server.stop()
            if code != 0:
                raise RuntimeError(f"server exited with {code}:\n{server.log.read_text()}")
            rows, counted = asyncio.run(stored_conversions(dsn))
            checks = {"rows": rows, "global": counted, "acked": load["acked"]}
            mem = None if args.skip_memory else memory(args, databases, workdir)
        finally:
            databases.drop_all()
            if embedded is not None:
                embedded.stop()
    text = report(args, command, postgres, load, mem, checks)
    print(text)
    if not args.no_write:
        benchkit.write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
