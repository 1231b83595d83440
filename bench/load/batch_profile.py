"""Where a whole server's time goes under 1,000-item `AllocateBatch` calls, or with `--unary`
single `Allocate`s (issue 10): `allocsvc serve --in-memory` under h2load, as h2.py's rows run
it, or with `--durable` the server on PostgreSQL (h2.py's `w1`: the embedded server, or
`ALLOCSVC_TEST_DSN`), or with `--redis` durable and sharing state through a redis-server
started for the run (a production replica; Redis's own CPU is not in the figures).

    python bench/load/batch_profile.py [--seconds 20] [--warmup 10] [--streams 2] [--unary]
        [--durable | --redis] [--perf] [--perf-data FILE]

After a warm-up (`--warmup` seconds), h2load sends h2.py's pre-serialized batch (each item its
own user id) for `--seconds` on 2 connections with `--streams` in flight each (`--unary`: its
single call, on 16 connections); the JSON line has allocations/s, server CPU per call (the
whole process, and its main thread alone), the cores of the server, the client and the
hypervisor's steal, how long the main thread waited for a core (ready to run; /proc schedstat),
the server's context switches per call by thread (/proc status: voluntary, a thread that
blocked and was woken; involuntary, one a waking thread took the core from), and the server's
calls by gRPC status. With `--perf`, `perf record
--call-graph dwarf` samples the server during the run; the main thread's samples are sorted by
what they are in (Rust's `prepare` or `finish`, other Rust calls, system calls, the garbage
collector, the rest: Python, gRPC's Cython layer, uvloop) and all the server's samples by
thread (`--perf-data` keeps them). Bounded: one server on 127.0.0.1, stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import h2  # bench/load/h2.py

WARMUP_S = 10.0
PERF_HZ = 300
KINDS = ("voluntary", "involuntary")


def category(frames: list[str]) -> str:
    """What a main-thread sample (its frames, innermost first) was in."""
    joined = " ".join(frames)
    if "PyPreparedBatch::finish" in joined:
        return "rust finish"
    if "PyBatchCatalogue::__pymethod_prepare__" in joined:
        return "rust prepare"
    if "_core::" in joined or "allocsvc_core::" in joined:
        return "rust other"
    if "entry_SYSCALL_64" in joined:
        return "system calls"
    if frames and (frames[0].startswith("finish_task_switch") or "__schedule" in joined):
        return "kernel scheduling"
    if "gc_collect_main" in joined:
        return "python gc"
    return "python, grpc, uvloop"


def shares(script: str) -> dict[str, float]:
    """Shares of the samples in `perf script -F ip,sym` output (each sample its frames, one a
    line, innermost first, then a blank line) by `category`."""
    counts: Counter[str] = Counter()
    frames: list[str] = []
    for line in [*script.splitlines(), ""]:
        parts = line.split(None, 1)
        if parts:
            frames.append(parts[1] if len(parts) > 1 else "?")
        elif frames:
            counts[category(frames)] += 1
            frames = []
    total = sum(counts.values()) or 1
    return {k: round(n / total, 3) for k, n in counts.most_common()}


def main_thread_shares(data: Path, main_tid: int) -> dict[str, float]:
    """`shares` of the main thread's samples in perf's `data`."""
    command = ["perf", "script", "-i", str(data), "--tid", str(main_tid), "-F", "ip,sym"]
    done = subprocess.run([*command, "--no-inline"], capture_output=True, text=True, check=True)
    return shares(done.stdout)


def _waited_s(tid: int) -> float:
    """Seconds thread `tid` (of the same process id) has waited on a run queue so far."""
    return int(Path(f"/proc/{tid}/task/{tid}/schedstat").read_text().split()[1]) / 1e9


def switches(pids: list[int]) -> Counter[tuple[str, str]]:
    """Context switches so far of the processes' threads, by (thread, kind): the thread `main`
    for each process's main thread, else its name (as `thread_shares`); the kind `voluntary`
    (it blocked, and was woken) or `involuntary` (a thread woken on its core took it)."""
    counts: Counter[tuple[str, str]] = Counter()
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
                status = (task / "status").read_text()
            except OSError:  # the thread ended meanwhile (as run.py's readers of /proc)
                continue
            for line in status.splitlines():
                kind, _, n = line.partition("_ctxt_switches:")
                if n:
                    counts[name, "involuntary" if kind.startswith("non") else "voluntary"] += int(n)
    return counts


def per_call(counts: Counter[tuple[str, str]], calls: int) -> dict[str, dict[str, float]]:
    """`switches` (a difference of two) over `calls` calls, by thread, the most switched first."""
    totals: Counter[str] = Counter()
    for (name, _), n in counts.items():
        totals[name] += n
    return {
        name: {kind: round(counts[name, kind] / max(calls, 1), 2) for kind in KINDS}
        for name, _ in totals.most_common()
    }


def thread_shares(data: Path, main_tid: int) -> dict[str, float]:
    """Shares of the server's samples by thread: `main`, else the thread's name (`python` for
    threads Python started, such as the write-behind's; `event_engine` gRPC's;
    `allocsvc-holder` the store's): where the CPU goes besides the main thread."""
    command = ["perf", "script", "-i", str(data), "-F", "tid,comm", "-G"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    counts: Counter[str] = Counter()
    for line in done.stdout.splitlines():
        name, _, tid = line.strip().rpartition(" ")  # perf prints the name first
        if tid.isdigit():
            counts["main" if int(tid) == main_tid else name.strip()] += 1
    total = sum(counts.values()) or 1
    return {k: round(n / total, 3) for k, n in counts.most_common()}


def measure(
    args: argparse.Namespace, workdir: Path, postgres: Any, redis: str = ""
) -> dict[str, Any]:
    h2load = h2.find_h2load()
    unary, _, batch = h2.grpc_body(workdir)
    body, items = (unary, 1) if args.unary else (batch, h2.BATCH_ITEMS)
    target = h2.start("w1" if args.durable else "mem", workdir, postgres, redis=redis)
    try:
        shape = h2.Shape(16, args.streams) if args.unary else h2.Shape(2, args.streams, batch=items)
        h2.run_h2load(h2load, target, body, shape, args.warmup)
        recorder = None
        data = workdir / "perf.data"
        if args.perf:
            pids = ",".join(map(str, target.setup.pids()))
            sampling = ["-F", str(PERF_HZ), "--call-graph", "dwarf,16384"]
            recorder = subprocess.Popen(
                ["perf", "record", *sampling, "-o", str(data), "-p", pids],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        main_tid = target.setup.pids()[0]
        waited = _waited_s(main_tid)
        switched = switches(target.setup.pids())
        began = time.monotonic()
        row = h2.run_h2load(h2load, target, body, shape, args.seconds)
        waited = (_waited_s(main_tid) - waited) / (time.monotonic() - began)
        switched = switches(target.setup.pids()) - switched
        if recorder is not None:
            recorder.send_signal(2)
            recorder.wait(timeout=120)
        out: dict[str, Any] = {
            "allocations_per_s": round(row["rps"] * items),
            "server_us_per_call": round(row["cpu_us_per_request"]),
            "main_thread_us_per_call": round(row["loop_us_per_request"]),
            "server_cores": round(row["server_cores"], 2),
            "client_cores": round(row["client_cores"], 2),
            "steal_cores": round(row["steal_cores"], 2),
            # Seconds per second the main thread was ready to run but had no core.
            "main_thread_waiting_for_a_core": round(waited, 2),
            "switches_per_call": per_call(switched, row["count"]),
            "errors": row["errors"],
            "ok_allocations_per_s": round(row["ok_per_s"] * items),
            # The server's calls by gRPC status (h2load cannot read them).
            "calls": row["detail"],
        }
        if recorder is not None:
            out["main_thread_samples"] = main_thread_shares(data, main_tid)
            out["thread_samples"] = thread_shares(data, main_tid)
            if args.perf_data:
                shutil.copy(data, args.perf_data)
        return out
    finally:
        target.setup.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    # Durable: the warm-up and the run together under `max_unexpanded_assignments` (10M by
    # default, about 12 s at 800,000/s), or past it the flushes write rows, not blocks.
    parser.add_argument("--warmup", type=float, default=WARMUP_S, help="seconds of warm-up")
    parser.add_argument("--streams", type=int, default=2, help="calls in flight per connection")
    parser.add_argument("--perf", action="store_true", help="sample the server with perf")
    parser.add_argument("--durable", action="store_true", help="serve from PostgreSQL")
    parser.add_argument(
        "--redis", action="store_true", help="serve from PostgreSQL, sharing state through Redis"
    )
    parser.add_argument(
        "--unary", action="store_true", help="unary `Allocate` on 16 connections, not batches"
    )
    parser.add_argument("--perf-data", type=Path, help="keep perf's samples in this file")
    args = parser.parse_args()
    args.durable = args.durable or args.redis
    if args.perf and shutil.which("perf") is None:
        raise SystemExit("--perf needs perf (apt-get install linux-perf)")
    with tempfile.TemporaryDirectory(prefix="allocsvc-batch-profile-") as tmp:
        if not args.durable:
            print(json.dumps(measure(args, Path(tmp), None)))
            return
        with h2.run.stores(Path(tmp)) as (postgres, redis_url):
            redis = redis_url if args.redis else ""
            print(json.dumps(measure(args, Path(tmp), postgres, redis)))


if __name__ == "__main__":
    main()
