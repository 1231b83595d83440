"""Allocate over gRPC against a do-nothing baseline (issue 3).

In one run: starts bench/load/echo.py (same grpc.aio stack, constant response) and the real
server (`python -m allocsvc serve --in-memory`) as separate processes on 127.0.0.1, creates a
running experiment segmented by source and device on the real one, then drives both with the
same load, one target at a time:

* unary `Allocate`: a Python grpc.aio client process with K calls in flight (and ghz, when it is
  installed or `--ghz install` may install it), measured for a fixed duration after a warm-up;
* `AllocateBatch` with batches of 1,000 requests from the same Python client.

Every request has its own user id (no sticky shortcut) and an Instagram/iPhone web context.
Prints a markdown table and, unless --no-write, writes it into bench/RESULTS.md as the section
"Allocator over gRPC (issue 3)" (replacing an earlier version of that section only).

    python bench/grpc_unary.py --duration 10 --warmup 3 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from load import benchkit  # bench/load/benchkit.py

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
SECTION = "## Allocator over gRPC (issue 3)"
EXPERIMENT_ID = "bench-checkout"
START_TIMEOUT_S = 30.0
BAR = 0.70


# Servers ---------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.process.pid)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _pinned(args: list[str], cpu: int | None) -> list[str]:
    """The command run on one CPU only (all its threads), when pinning is on."""
    if cpu is None:
        return args
    return [sys.executable, "-c", _PIN, str(cpu), *args]


# Sets the CPU affinity before exec, so every thread the program starts inherits it.
_PIN = (
    "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def _start(name: str, args: list[str], workdir: Path) -> Server:
    log = workdir / f"{name}.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read_text()}")
        serving = benchkit.log_entry(log, "serving")
        if serving:
            server = Server(name, process, int(serving["port"]), log)
            benchkit.wait_health(server.target, deadline)
            return server
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"{name} did not start within {START_TIMEOUT_S} s:\n{log.read_text()}")


def _create_experiment(server: Server) -> pb.AllocateResponse:
    """The benchmark's experiment on the real server; returns one sample allocation."""
    experiment = pb.Experiment(
        id=EXPERIMENT_ID,
        name="Checkout button",
        status=pb.EXPERIMENT_STATUS_RUNNING,
        variants=[
            pb.Variant(id="A", name="Blue button", payload_json='{"color": "blue", "text": "Buy"}'),
            pb.Variant(
                id="B", name="Green button", payload_json='{"color": "green", "text": "Buy now"}'
            ),
        ],
        segmentation=benchkit.manual_segmentation(),
    )
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.AdminStub(channel).CreateExperiment(
            pb.CreateExperimentRequest(experiment=experiment), timeout=10
        )
        sample: pb.AllocateResponse = pb_grpc.AllocatorStub(channel).Allocate(
            pb.AllocateRequest(
                experiment_id=EXPERIMENT_ID, user_id="probe", context=benchkit.CONTEXT
            ),
            timeout=10,
        )
    if sample.segment_key != "source:instagram|device:mobile":
        raise RuntimeError(f"unexpected segment key {sample.segment_key!r}")
    return sample


# Python client (runs in its own process: `grpc_unary.py --as-client ...`) ----------------------


async def _client(args: argparse.Namespace) -> dict[str, object]:
    channel = grpc.aio.insecure_channel(
        args.target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    )
    stub = pb_grpc.AllocatorStub(channel)
    await channel.channel_ready()
    latencies: list[float] = []
    items = 0
    state = {"measuring": False, "stop": False}

    async def unary(worker: int) -> None:
        nonlocal items
        i = 0
        while not state["stop"]:
            request = pb.AllocateRequest(
                experiment_id=EXPERIMENT_ID,
                user_id=f"{args.run}-{worker}-{i}",
                context=benchkit.CONTEXT,
            )
            i += 1
            start = time.perf_counter()
            await stub.Allocate(request, timeout=30)
            if state["measuring"]:
                latencies.append(time.perf_counter() - start)
                items += 1

    async def batch(worker: int) -> None:
        nonlocal items
        i = 0
        while not state["stop"]:
            request = pb.AllocateBatchRequest(
                requests=[
                    pb.AllocateRequest(
                        experiment_id=EXPERIMENT_ID,
                        user_id=f"{args.run}-{worker}-{i}-{j}",
                        context=benchkit.CONTEXT,
                    )
                    for j in range(args.batch_size)
                ]
            )
            i += 1
            start = time.perf_counter()
            reply = await stub.AllocateBatch(request, timeout=60)
            if len(reply.results) != args.batch_size or reply.results[-1].HasField("error"):
                raise RuntimeError(f"bad batch reply: {reply.results[-1]}")
            if state["measuring"]:
                latencies.append(time.perf_counter() - start)
                items += len(reply.results)

    work = unary if args.mode == "unary" else batch
    tasks = [asyncio.create_task(work(w)) for w in range(args.concurrency)]
    await asyncio.sleep(args.warmup)
    state["measuring"] = True
    cpu0, server_cpu0, t0 = time.process_time(), _cpu_seconds(args.server_pid), time.perf_counter()
    await asyncio.sleep(args.duration)
    state["measuring"] = False
    elapsed = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    server_cpu = _cpu_seconds(args.server_pid) - server_cpu0
    state["stop"] = True
    await asyncio.gather(*tasks)
    await channel.close()
    latencies.sort()
    return {
        "calls": len(latencies),
        "items": items,
        "seconds": elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "server_cpu": server_cpu / elapsed,
        "client_cpu": client_cpu / elapsed,
    }


def _run_python_client(
    server: Server, mode: str, args: argparse.Namespace, concurrency: int, run: str
) -> dict[str, object]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--as-client",
        "--target", server.target,
        "--server-pid", str(server.process.pid),
        "--mode", mode,
        "--run", run,
        "--concurrency", str(concurrency),
        "--warmup", str(args.warmup),
        "--duration", str(args.duration),
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    limit = args.warmup + args.duration + 120
    command = _pinned(command, args.client_cpu)
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"client failed against {server.name}:\n{done.stderr}")
    result: dict[str, object] = json.loads(done.stdout)
    return result


# ghz ---------------------------------------------------------------------------------------


def _ghz(install: bool) -> str | None:
    found = benchkit.find_ghz(install)
    if found is None:
        print(
            "ghz: not installed (or too old) and not installed now; the Python client only",
            file=sys.stderr,
        )
    return found


def _protoset(workdir: Path) -> Path:
    """The API's descriptor set for ghz.

    ghz resolves `Service.Method` symbols through reflection, and Python's reflection server
    (upb descriptor pool) answers only message/service/file symbols, not method names ("Symbol
    not found: allocsvc.v1.Allocator.Allocate"), so ghz gets the descriptors from a file.
    """
    import grpc_tools

    out = workdir / "allocsvc.protoset"
    includes = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{HERE.parent / 'proto'}", f"-I{includes}",
            "--include_imports", f"--descriptor_set_out={out}",
            str(HERE.parent / "proto" / "allocsvc" / "v1" / "allocsvc.proto"),
        ],
        check=True,
    )  # fmt: skip
    return out


def _run_ghz(
    ghz: str, server: Server, args: argparse.Namespace, run: str, protoset: Path
) -> dict[str, object]:
    def call(seconds: float, label: str) -> tuple[dict[str, object], float, float]:
        data = {
            "experiment_id": EXPERIMENT_ID,
            "user_id": f"{run}-{label}-{{{{.RequestNumber}}}}",
            "context": benchkit.CONTEXT,
        }
        command = [
            ghz, "--insecure", "--protoset", str(protoset),
            "--call", "allocsvc.v1.Allocator/Allocate",
            "-d", json.dumps(data),
            "-c", str(args.concurrency),
            "--connections", "1",
            "--cpus", str(args.ghz_cpus),
            "-z", f"{seconds}s",
            "--duration-stop", "ignore",
            "-O", "json",
            server.target,
        ]  # fmt: skip
        command = _pinned(command, args.client_cpu)
        cpu0 = server.cpu_seconds()
        children0 = os.times()
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 120, check=False
        )
        children1 = os.times()
        server_cpu = server.cpu_seconds() - cpu0
        client_cpu = (children1.children_user + children1.children_system) - (
            children0.children_user + children0.children_system
        )
        if done.returncode != 0:
            raise RuntimeError(f"ghz failed against {server.name}:\n{done.stderr}")
        return json.loads(done.stdout), server_cpu, client_cpu

    call(args.warmup, "warm")
    report, server_cpu, client_cpu = call(args.duration, "run")
    codes = report.get("statusCodeDistribution") or {}
    bad = {k: v for k, v in codes.items() if k != "OK"}
    if bad:
        raise RuntimeError(f"ghz against {server.name}: non-OK answers {bad}")
    percentiles = {int(p["percentage"]): p["latency"] / 1e6 for p in report["latencyDistribution"]}
    seconds = report["total"] / 1e9
    return {
        "calls": report["count"],
        "items": report["count"],
        "seconds": seconds,
        "rps": report["rps"],
        "p50_ms": percentiles[50],
        "p99_ms": percentiles[99],
        "server_cpu": server_cpu / seconds,
        "client_cpu": client_cpu / seconds,
    }


# Report ------------------------------------------------------------------------------------


def _combine(rounds: list[dict[str, object]]) -> dict[str, Any]:
    """Rounds of one (target, client): rates over the total time, median latencies."""
    seconds = sum(float(r["seconds"]) for r in rounds)  # type: ignore[arg-type]
    return {
        "each": [int(r["calls"]) / float(r["seconds"]) for r in rounds],  # type: ignore[call-overload, arg-type]
        "calls_per_s": sum(int(r["calls"]) for r in rounds) / seconds,  # type: ignore[call-overload]
        "items_per_s": sum(int(r["items"]) for r in rounds) / seconds,  # type: ignore[call-overload]
        "p50_ms": statistics.median(float(r["p50_ms"]) for r in rounds),  # type: ignore[arg-type]
        "p99_ms": statistics.median(float(r["p99_ms"]) for r in rounds),  # type: ignore[arg-type]
        "server_cpu": statistics.mean(float(r["server_cpu"]) for r in rounds),  # type: ignore[arg-type]
        # Server CPU time per allocation, in microseconds, over all rounds.
        "server_us": 1e6
        * sum(float(r["server_cpu"]) * float(r["seconds"]) for r in rounds)  # type: ignore[arg-type]
        / sum(int(r["items"]) for r in rounds),  # type: ignore[call-overload]
        "client_cpu": statistics.mean(float(r["client_cpu"]) for r in rounds),  # type: ignore[arg-type]
    }


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _machine(load_at_start: str) -> str:
    return (
        f"{benchkit.machine()}; "
        f"load average (1, 5, 15 min) at the start: {load_at_start}, at the end: {_load()} "
        "(other work shared the machine)"
    )


def _report(
    args: argparse.Namespace,
    unary: dict[tuple[str, str], dict[str, Any]],
    batch: dict[str, dict[str, Any]],
    command: str,
) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Machine: {_machine(args.load_at_start)}.",
        "",
        "Baseline: `bench/load/echo.py`, a bare grpc.aio server on the same stack and options "
        "answering `Allocate` with a constant `AllocateResponse` of the real size. Real: `python "
        "-m allocsvc serve --in-memory --seed 7` with a running 2-variant Thompson experiment "
        "segmented by source and device (min 100 samples per segment). Each request has a new "
        "user id (no sticky shortcut) and an Instagram/iPhone web context, so every call "
        "extracts the context, walks the cascade, samples, counts and records an assignment. "
        "Both servers are single processes, each on uvloop (one event loop). "
        "**The load generator runs on the "
        f"same {os.cpu_count()}-core machine as the server**"
        + (
            " (servers pinned to CPU 0, client processes to CPU 1)"
            if args.server_cpu is not None
            else " (not pinned)"
        )
        + "; the client is identical for both targets. "
        "ghz gets the API from a protoset (see `_protoset`). "
        f"{args.warmup:g} s warm-up, then {args.duration:g} s measured, "
        f"{args.rounds} round(s) per target, targets alternating, all unary rounds before the "
        "batch rounds. CPU columns are cores used "
        "(CPU seconds / wall seconds) during the measured window.",
        "",
        "| target | client | in flight | calls/s (each round) | p50 ms | p99 ms | server CPU "
        "| server CPU µs per allocation | client CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (target, client), r in unary.items():
        lines.append(
            f"| {target} `Allocate` | {client} | {args.concurrency} | **{r['calls_per_s']:,.0f}** "
            f"({', '.join(f'{x:,.0f}' for x in r['each'])}) "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_cpu']:.2f} "
            f"| {r['server_us']:.0f} | {r['client_cpu']:.2f} |"
        )
    for target, r in batch.items():
        lines.append(
            f"| {target} `AllocateBatch` x{args.batch_size} | Python grpc.aio "
            f"| {args.batch_concurrency} | {r['calls_per_s']:,.1f} batches = "
            f"**{r['items_per_s']:,.0f} allocations/s** | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['server_cpu']:.2f} | {r['server_us']:.1f} | {r['client_cpu']:.2f} |"
        )
    lines += ["", "| ratio | measured | bar | status |", "|---|---:|---:|---|"]
    for client in sorted({c for _, c in unary}):
        real, echo = unary.get(("allocsvc", client)), unary.get(("echo", client))
        if real and echo:
            ratio = real["calls_per_s"] / echo["calls_per_s"]
            status = "met" if ratio >= BAR else "**NOT met**"
            lines.append(
                f"| `Allocate` calls/s, allocsvc / echo ({client}) | {ratio:.1%} "
                f"| >= {BAR:.0%} | {status} |"
            )
            cost = echo["server_us"] / real["server_us"]
            lines.append(
                f"| `Allocate` server CPU per call, echo / allocsvc ({client}) | {cost:.1%} "
                "| (info) | - |"
            )
    if "allocsvc" in batch and "echo" in batch:
        ratio = batch["allocsvc"]["items_per_s"] / batch["echo"]["items_per_s"]
        lines.append(
            f"| `AllocateBatch` allocations/s, allocsvc / echo | {ratio:.1%} | (none) | - |"
        )
    if "allocsvc" in batch and unary.get(("allocsvc", "Python grpc.aio")):
        gain = (
            batch["allocsvc"]["items_per_s"] / unary[("allocsvc", "Python grpc.aio")]["calls_per_s"]
        )
        lines.append(
            f"| allocsvc allocations/s, `AllocateBatch` / unary (Python client) | {gain:.1f}x "
            "| (none) | - |"
        )
    echo_py, real_py = (
        unary.get(("echo", "Python grpc.aio")),
        unary.get(("allocsvc", "Python grpc.aio")),
    )
    if echo_py and real_py:
        cores = f"{echo_py['server_cpu']:.2f} and {real_py['server_cpu']:.2f}"
        if min(echo_py["server_cpu"], real_py["server_cpu"]) >= 0.9:
            limit = f"The server, one event loop, is the bottleneck in both cases ({cores} cores)."
        else:
            limit = (
                f"The servers did not use a full core ({cores}): the client or other work on the "
                "machine limited the rate, so the CPU-per-call ratio is the better figure."
            )
        extra = real_py["server_us"] - echo_py["server_us"]
        lines += [
            "",
            f"Reading: a unary call costs the bare grpc.aio server {echo_py['server_us']:.0f} µs "
            f"of CPU (HTTP/2, protobuf, asyncio); allocsvc adds {extra:.0f} µs of its own work "
            "(validation, context extraction, the Rust decision, the assignment record, the "
            f"response). {limit}",
        ]
    if "allocsvc" in batch:
        per_batch_ms = batch["allocsvc"]["server_us"] * args.batch_size / 1000
        lines.append(
            f"An `AllocateBatch` of {args.batch_size:,} costs {per_batch_ms:.0f} ms of server CPU "
            "on the event loop, during which no other call is served (see its p99); a "
            "10,000-item batch holds the loop about ten times as long."
        )
    return "\n".join(lines) + "\n"


# Main --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per run")
    parser.add_argument("--concurrency", type=int, default=32, help="unary calls in flight")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--batch-concurrency", type=int, default=2, help="batches in flight")
    parser.add_argument("--rounds", type=int, default=2, help="runs per target, alternating")
    parser.add_argument(
        "--ghz",
        choices=("auto", "install", "off"),
        default="auto",
        help="also load with ghz: when found (auto), installing it with `go install` if "
        "missing (install), or never (off)",
    )
    parser.add_argument("--ghz-cpus", type=int, default=1, help="cores ghz may use")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the servers to CPU 0 and the clients to CPU 1 (pinning needs 2+ CPUs)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    # Internal: the client process.
    parser.add_argument("--as-client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("unary", "batch"), help=argparse.SUPPRESS)
    parser.add_argument("--run", default="run", help=argparse.SUPPRESS)
    return parser


def main() -> int:
    args = _parser().parse_args()
    pin = not args.no_pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
    args.server_cpu, args.client_cpu = (0, 1) if pin else (None, None)
    args.load_at_start = _load()
    if args.as_client:
        print(json.dumps(asyncio.run(_client(args))))
        return 0

    command = "cd /work/main && " + shlex.join(
        ["/work/venv/bin/python", "bench/grpc_unary.py", *sys.argv[1:]]
    )
    ghz = None if args.ghz == "off" else _ghz(install=args.ghz == "install")
    workdir = Path(tempfile.mkdtemp(prefix="allocsvc-bench-"))
    servers: list[Server] = []
    try:
        echo_args = [sys.executable, str(HERE / "load" / "echo.py")]
        echo = _start("echo", _pinned(echo_args, args.server_cpu), workdir)
        servers.append(echo)
        real_args = [sys.executable, "-m", "allocsvc", "serve", "--host", "127.0.0.1"]
        real_args += ["--port", "0", "--seed", "7", "--in-memory"]
        real = _start("allocsvc", _pinned(real_args, args.server_cpu), workdir)
        servers.append(real)
        _create_experiment(real)
        protoset = _protoset(workdir) if ghz else workdir

        unary_rounds: dict[tuple[str, str], list[dict[str, object]]] = {}
        batch_rounds: dict[str, list[dict[str, object]]] = {}
        # All unary rounds first: the batch runs add hundreds of thousands of assignments to
        # the real server's memory, which would otherwise weigh on the later unary rounds.
        for round_no in range(args.rounds):
            for server in (echo, real):
                run = f"r{round_no}"
                key = (server.name, "Python grpc.aio")
                print(f"round {round_no + 1}: {server.name} unary, Python client", file=sys.stderr)
                unary_rounds.setdefault(key, []).append(
                    _run_python_client(server, "unary", args, args.concurrency, run + "u")
                )
                if ghz:
                    print(f"round {round_no + 1}: {server.name} unary, ghz", file=sys.stderr)
                    unary_rounds.setdefault((server.name, "ghz"), []).append(
                        _run_ghz(ghz, server, args, run + "g", protoset)
                    )
        for round_no in range(args.rounds):
            for server in (echo, real):
                print(f"round {round_no + 1}: {server.name} batch", file=sys.stderr)
                batch_rounds.setdefault(server.name, []).append(
                    _run_python_client(
                        server, "batch", args, args.batch_concurrency, f"r{round_no}b"
                    )
                )
        unary = {key: _combine(rounds) for key, rounds in unary_rounds.items()}
        batch = {name: _combine(rounds) for name, rounds in batch_rounds.items()}
    finally:
        codes = {s.name: s.stop() for s in servers}
    if any(codes.values()):
        raise RuntimeError(f"a server did not exit cleanly: {codes}; logs in {workdir}")
    text = _report(args, unary, batch, command)
    print(text)
    if not args.no_write:
        benchkit.write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
