"""Where a whole server's event loop spends its time under 1,000-item `AllocateBatch` calls
(issue 10): `allocsvc serve --in-memory` under h2load, as h2.py's batch row runs it, or with
`--durable` the server on PostgreSQL (h2.py's `w1`: the embedded server, or `ALLOCSVC_TEST_DSN`).

    python bench/load/batch_profile.py [--seconds 20] [--streams 2] [--perf] [--durable]

After a warm-up, h2load sends h2.py's pre-serialized batch (each item its own user id) for
`--seconds` on 2 connections with `--streams` in flight each; the JSON line has allocations/s,
server CPU per batch (the whole process, and its main thread alone), the cores of the server,
the client and the hypervisor's steal, and the server's calls by gRPC status. With `--perf`,
`perf record --call-graph dwarf` samples the server during the run, and the main thread's
samples are sorted by what they are in: Rust's `prepare` or `finish`, other Rust calls, system
calls, the garbage collector, the rest (Python, gRPC's Cython layer, uvloop). Bounded: one
server on 127.0.0.1, stopped at the end.
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


def measure(args: argparse.Namespace, workdir: Path, postgres: Any) -> dict[str, Any]:
    h2load = h2.find_h2load()
    _, _, batch = h2.grpc_body(workdir)
    target = h2.start("w1" if args.durable else "mem", workdir, postgres)
    try:
        shape = h2.Shape(2, args.streams, batch=h2.BATCH_ITEMS)
        h2.run_h2load(h2load, target, batch, shape, WARMUP_S)
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
        row = h2.run_h2load(h2load, target, batch, shape, args.seconds)
        if recorder is not None:
            recorder.send_signal(2)
            recorder.wait(timeout=120)
        out: dict[str, Any] = {
            "allocations_per_s": round(row["rps"] * h2.BATCH_ITEMS),
            "server_us_per_batch": round(row["cpu_us_per_request"]),
            "main_thread_us_per_batch": round(row["loop_us_per_request"]),
            "server_cores": round(row["server_cores"], 2),
            "client_cores": round(row["client_cores"], 2),
            "steal_cores": round(row["steal_cores"], 2),
            "errors": row["errors"],
            "ok_allocations_per_s": round(row["ok_per_s"] * h2.BATCH_ITEMS),
            # The server's calls by gRPC status (h2load cannot read them).
            "calls": row["detail"],
        }
        if recorder is not None:
            out["main_thread_samples"] = main_thread_shares(data, target.setup.pids()[0])
        return out
    finally:
        target.setup.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--streams", type=int, default=2, help="batches in flight per connection")
    parser.add_argument("--perf", action="store_true", help="sample the server with perf")
    parser.add_argument("--durable", action="store_true", help="serve from PostgreSQL")
    args = parser.parse_args()
    if args.perf and shutil.which("perf") is None:
        raise SystemExit("--perf needs perf (apt-get install linux-perf)")
    with tempfile.TemporaryDirectory(prefix="allocsvc-batch-profile-") as tmp:
        if not args.durable:
            print(json.dumps(measure(args, Path(tmp), None)))
            return
        with h2.run.stores(Path(tmp)) as (postgres, _redis_url):
            print(json.dumps(measure(args, Path(tmp), postgres)))


if __name__ == "__main__":
    main()
