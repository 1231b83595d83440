"""What holds allocsvc's event loop (issue 10: the tail latency of unary `Allocate`).

Runs the server in this process (`allocsvc.server.start`, uvloop, as `allocsvc serve --workers
1` does) with probes, drives it open loop at a fixed rate with bench/load/openloop, and reports:

- event-loop stalls: a task sleeps 1 ms again and again and records how late it wakes; a
  lateness over `--stall-ms` is a stall (the loop ran something else that long);
- the garbage collector: every collection's generation and duration (`gc.callbacks`);
- the periodic work: every scheduler job (`Scheduler.every`, wrapped here) and the write-behind
  flush (`PostgresJournal._flush`, wrapped here), each step of theirs on the loop (from one
  await to the next: what they hold the loop for), and the segment-tree builds (in a thread,
  holding the GIL while they run Python);
- for each stall, what overlapped it (a collection, a job run, a flush), and the stall time
  by cause.

    python bench/load/stalls.py --rate 1000 --seconds 30             # embedded PostgreSQL
    python bench/load/stalls.py --rate 1000 --seconds 30 --in-memory

Everything on 127.0.0.1, bounded in time. The numbers are this process's own (the server's);
the client runs in its own process. The wrappers are measurement only: the server's code is
the same as `allocsvc serve` runs (the probes add a wake-up per millisecond).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchkit  # bench/load/benchkit.py
import h2  # bench/load/h2.py: the request bodies and the openloop build
import run  # bench/load/run.py: stores, experiments

from allocsvc import server
from allocsvc.config import Settings
from allocsvc.tasks.scheduler import Scheduler


@dataclass
class Interval:
    """Something that ran in the server process from `start` to `end` (perf_counter s)."""

    kind: str
    start: float
    end: float
    # For a stall, over the probe's sleep that ended in it: the loop thread's seconds on a
    # CPU and runnable but waiting for one.
    on_cpu: float = 0.0
    runnable: float = 0.0
    # For work: the running thread's CPU seconds in it (less than end - start when the thread
    # was preempted meanwhile: the work's own cost on an idle machine).
    cpu: float = 0.0


@dataclass
class Probes:
    """What the probes saw, in perf_counter seconds."""

    stall_s: float
    stalls: list[Interval] = field(default_factory=list)
    work: list[Interval] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    heap: dict[str, int] = field(default_factory=dict)
    _gc_start: tuple[float, float] = (0.0, 0.0)
    recording: bool = False

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter(), time.thread_time()
        if phase == "start":
            self._gc_start = now
        elif self.recording:
            kind = f"gc gen {info['generation']}"
            start, cpu = self._gc_start
            self.work.append(Interval(kind, start, now[0], cpu=now[1] - cpu))

    def timed(self, kind: str, job: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """`job`, each of its steps on the loop (from one await to the next) recorded: the
        time it held the loop, not the time it waited."""

        async def wrapped() -> None:
            await _Stepped(job(), lambda start, end, cpu: self._step(kind, start, end, cpu))

        return wrapped

    def _step(self, kind: str, start: float, end: float, cpu: float) -> None:
        if self.recording:
            self.work.append(Interval(kind, start, end, cpu=cpu))

    async def watch_loop(self, period: float = 0.001) -> None:
        """Sleep `period` again and again; a wake-up later than `stall_s` is a stall. For each
        stall, how the loop's thread spent it (its /proc schedstat): on a CPU, waiting for
        one (runnable: other processes or threads had the cores), or neither (blocked: waiting
        for the GIL another thread held, or in a blocking call)."""
        schedstat = Path("/proc/thread-self/schedstat")
        with schedstat.open() as f:
            while True:
                before = time.perf_counter()
                f.seek(0)
                on_cpu0, waiting0 = (int(x) for x in f.read().split()[:2])
                await asyncio.sleep(period)
                late = time.perf_counter() - before - period
                if self.recording:
                    self.lateness.append(late)
                    if late > self.stall_s:
                        f.seek(0)
                        on_cpu, waiting = (int(x) for x in f.read().split()[:2])
                        stall = Interval("stall", before + period, before + period + late)
                        stall.on_cpu = (on_cpu - on_cpu0) / 1e9
                        stall.runnable = (waiting - waiting0) / 1e9
                        self.stalls.append(stall)


class _Stepped:
    """Await a coroutine step by step, calling `record(start, end, cpu)` for each step: the
    time between being resumed and yielding again (what it ran on the loop without awaiting),
    and the thread's CPU time in it."""

    def __init__(self, coroutine: Awaitable[None], record: Callable[[float, float, float], None]):
        self._coroutine: Any = coroutine.__await__()
        self._record = record

    def __await__(self) -> Generator[Any, Any, None]:
        value: Any = None
        error: BaseException | None = None
        while True:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                if error is not None:
                    yielded = self._coroutine.throw(error)
                else:
                    yielded = self._coroutine.send(value)
            except StopIteration:
                self._record(start, time.perf_counter(), time.thread_time() - cpu)
                return
            self._record(start, time.perf_counter(), time.thread_time() - cpu)
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # handed to the coroutine, as a Task would
                value, error = None, exc


@contextlib.contextmanager
def instrumented(probes: Probes) -> Iterator[None]:
    """Wrap the scheduler's jobs and the write-behind flush, and watch the collector."""
    every = Scheduler.every

    def every_timed(
        self: Scheduler, name: str, seconds: float, job: Callable[[], Awaitable[None]]
    ) -> None:
        every(self, name, seconds, probes.timed(f"job {name}", job))

    from allocsvc.store import writebehind

    flush = writebehind.PostgresJournal._flush

    async def flush_timed(self: Any) -> None:
        await probes.timed("write-behind flush", lambda: flush(self))()

    from allocsvc.allocation import insights

    build_tree = getattr(insights, "build_tree")  # noqa: B009 (not exported)

    def build_tree_timed(*args: Any, **kwargs: Any) -> Any:
        # In a worker thread (asyncio.to_thread), holding the GIL while it runs Python.
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return build_tree(*args, **kwargs)
        finally:
            end = time.perf_counter()
            probes._step("tree build (thread)", start, end, time.thread_time() - cpu)

    setattr(insights, "build_tree", build_tree_timed)  # noqa: B010
    Scheduler.every = every_timed  # type: ignore[method-assign]
    writebehind.PostgresJournal._flush = flush_timed  # type: ignore[method-assign]
    gc.callbacks.append(probes.on_gc)
    try:
        yield
    finally:
        gc.callbacks.remove(probes.on_gc)
        Scheduler.every = every  # type: ignore[method-assign]
        writebehind.PostgresJournal._flush = flush  # type: ignore[method-assign]
        setattr(insights, "build_tree", build_tree)  # noqa: B010


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def slow_calls(probes: Probes, series: Path, slow_s: float) -> dict[str, Any]:
    """The calls slower than `slow_s` (from their due time, openloop's -series), each put
    with what it overlapped in the server: a loop stall (by the stall's cause), or none (the
    time went elsewhere: the server's gRPC threads, the kernel, the client, queueing behind
    other calls)."""
    # openloop writes wall-clock times, the probes perf_counter ones.
    offset = time.time() - time.perf_counter()
    stalls = sorted(probes.stalls, key=lambda s: s.start)
    causes = {id(s): _causes(probes, s) or "unexplained" for s in stalls}
    by: dict[str, int] = defaultdict(int)
    count = slow = 0
    for line in series.read_text().splitlines():
        due_ns, latency_ns, code, _lag_ns = line.split("\t")
        count += 1
        latency = int(latency_ns) / 1e9
        if code != "OK" or latency <= slow_s:
            continue
        slow += 1
        due = int(due_ns) / 1e9 - offset
        hit = sorted({causes[id(s)] for s in stalls if s.start < due + latency and s.end > due})
        by[" | ".join(f"stall: {c}" for c in hit) or "no loop stall"] += 1
    return {
        "threshold_ms": slow_s * 1000,
        "calls": count,
        "slow": slow,
        "by_overlap": dict(sorted(by.items(), key=lambda kv: -kv[1])),
    }


def _causes(probes: Probes, stall: Interval) -> str:
    kinds = {w.kind for w in probes.work if w.start < stall.end and w.end > stall.start}
    return " + ".join(sorted(kinds))


def summarize(probes: Probes, window: float) -> dict[str, Any]:
    """Stalls by cause (each stall to every kind of work overlapping it, else 'unexplained'),
    and every kind of work: its steps (a collection is one step; a job's steps are its runs
    between awaits), total and longest time."""
    by_cause: dict[str, list[float]] = defaultdict(list)
    threads: dict[str, float] = defaultdict(float)
    for stall in probes.stalls:
        causes = _causes(probes, stall)
        by_cause[causes or "unexplained"].append(stall.end - stall.start)
        if not causes:
            # The lateness by the thread's state over the whole sleep that ended late (the
            # sleep's own 1 ms is time blocked as asked, left out).
            late = stall.end - stall.start
            threads["on CPU"] += stall.on_cpu
            threads["runnable, waiting for a CPU"] += stall.runnable
            threads["blocked (GIL, blocking call)"] += max(
                0.0, late - stall.on_cpu - stall.runnable
            )
    work: dict[str, list[float]] = defaultdict(list)
    work_cpu: dict[str, list[float]] = defaultdict(list)
    for w in probes.work:
        work[w.kind].append(w.end - w.start)
        work_cpu[w.kind].append(w.cpu)
    late_ms = [x * 1000 for x in probes.lateness]
    return {
        "window_s": window,
        "loop_lateness_ms": {
            "wakeups": len(late_ms),
            "p50": _pct(late_ms, 0.5),
            "p99": _pct(late_ms, 0.99),
            "p999": _pct(late_ms, 0.999),
            "max": max(late_ms, default=float("nan")),
        },
        "stalls": {
            cause: {
                "count": len(v),
                "total_ms": round(sum(v) * 1000, 1),
                "max_ms": round(max(v) * 1000, 1),
            }
            for cause, v in sorted(by_cause.items(), key=lambda kv: -sum(kv[1]))
        },
        "unexplained_stalls_loop_thread_ms": {k: round(v * 1000, 1) for k, v in threads.items()},
        "work": {
            kind: {
                "steps": len(v),
                "per_s": round(len(v) / window, 2),
                "total_ms": round(sum(v) * 1000, 1),
                "mean_ms": round(sum(v) / len(v) * 1000, 3),
                "max_ms": round(max(v) * 1000, 1),
                "cpu_total_ms": round(sum(work_cpu[kind]) * 1000, 1),
                "cpu_max_ms": round(max(work_cpu[kind]) * 1000, 1),
            }
            for kind, v in sorted(work.items(), key=lambda kv: -sum(kv[1]))
        },
    }


async def measure(settings: Settings, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    probes = Probes(stall_s=args.stall_ms / 1000)
    with instrumented(probes):
        running = await server.start(settings)
        if args.gc_freeze and settings.gc.freeze_after_start:
            # As `allocsvc serve` does once started (serve_until_signalled).
            gc.collect()
            gc.freeze()
        probes.heap = {"objects": len(gc.get_objects()), "frozen": gc.get_freeze_count()}
        watcher = asyncio.create_task(probes.watch_loop())
        try:
            setup = run.Setup("stalls", running.port)
            await asyncio.to_thread(run._create_experiments, setup)
            await asyncio.to_thread(run._wait_known, setup)
            openloop = await asyncio.to_thread(h2.build_openloop, workdir)
            _, message, _ = h2.grpc_body(workdir)
            command = h2.openloop_command(
                openloop,
                setup.target,
                message,
                args.rate,
                args.conns,
                args.seconds,
                args.warmup,
                series=workdir / "series.tsv",
            )
            client = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
            await asyncio.sleep(args.warmup)
            probes.recording = True
            started, machine0, own0 = time.perf_counter(), h2._machine(), os.times()
            out, _ = await client.communicate()
            window = time.perf_counter() - started
            machine1, own1 = h2._machine(), os.times()
            probes.recording = False
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await server.stop(running, 5)
    client_numbers = json.loads(out)
    summary = summarize(probes, window)
    summary["slow_calls"] = slow_calls(probes, workdir / "series.tsv", args.slow_ms / 1000)
    own = (own1.user + own1.system - own0.user - own0.system) / window
    client_cores = (
        own1.children_user + own1.children_system - own0.children_user - own0.children_system
    ) / window
    busy = (machine1[0] - machine0[0]) / window
    summary["cores"] = {
        "server": round(own, 2),
        "client": round(client_cores, 2),
        "machine_busy": round(busy, 2),
        # Busy cores none of ours used (PostgreSQL's included), and the hypervisor's steal.
        "other": round(max(0.0, busy - own - client_cores), 2),
        "steal": round((machine1[1] - machine0[1]) / window, 2),
    }
    summary["client"] = {
        k: client_numbers[k]
        for k in ("rate_asked", "rps", "codes", "p50_ms", "p99_ms", "p999_ms", "max_ms")
    }
    summary["gc"] = {"thresholds": gc.get_threshold(), "after_start": probes.heap}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=1000, help="calls per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--conns", type=int, default=h2.STEADY_CONNECTIONS)
    parser.add_argument("--stall-ms", type=float, default=2.0, help="lateness that is a stall")
    parser.add_argument("--slow-ms", type=float, default=5.0, help="a slow call (issue 10's bar)")
    parser.add_argument("--in-memory", action="store_true", help="no PostgreSQL")
    parser.add_argument(
        "--no-metrics", dest="metrics", action="store_false", help="no --metrics-port"
    )
    parser.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="no gc.collect() and gc.freeze() after start (`allocsvc serve` does both, unless "
        "gc.freeze_after_start is off)",
    )
    args = parser.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory(prefix="allocsvc-stalls-") as tmp:
        workdir = Path(tmp)
        with run.stores(workdir) as (postgres, _redis):
            dsn = None if args.in_memory else run.database(postgres, "stalls")
            settings = Settings.model_validate(
                {
                    "port": run._free_port(),
                    "in_memory": args.in_memory,
                    "postgres_dsn": dsn,
                    "seed": 7,
                    "log_level": "WARNING",
                    # As h2.py runs it: metrics served, so their snapshot job runs too.
                    "metrics_port": run._free_port() if args.metrics else None,
                }
            )
            summary = uvloop.run(measure(settings, args, workdir))
    summary["setup"] = {
        "in_memory": args.in_memory,
        "machine": benchkit.machine(),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
