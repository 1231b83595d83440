"""This tree against an earlier commit, in one run (issue 10): what a change moved, under load.

    python bench/load/ab.py --base c4c640d [--rounds 3] [--seconds 10] [--kinds batch,unary]
        [--durable | --redis] [--rate 1600] [--sticky]

This VM's steal drifts over minutes, so two builds measured one after the other (or in two
h2.py runs) cannot be compared. Here both run at once, each `allocsvc serve --in-memory
--workers 1` (no PostgreSQL: the allocation path alone), or with `--durable` each on its own
database of one embedded PostgreSQL (every assignment written behind, as `allocsvc serve`
runs by default), or with `--redis` durable and each sharing state through its own database of
one redis-server (a production replica), next to bench/load/echo.py; then rounds
of h2.py's closed-loop runs, every setup in turn, the order rotated each round: unary
`Allocate` at 16 connections x 2 streams, `AllocateBatch` of 1,000 items at 2 x 2. The base is
the commit's source in a git worktree, its Rust extension built there with maturin (a few
minutes the first time; cargo's target directory stays in $TMPDIR/allocsvc-ab-target for the
next run) and served with PYTHONPATH pointing at that worktree. A ratio is taken within a
round, then the median over the rounds that other work and steal left alone (h2.py's
CONTENDED_CORES). Bounded: rounds x kinds x 3 runs of `--seconds` each, after a short warm-up.
Prints a markdown table.

With `--sticky`, every unary call names one user in run.py's sticky experiment: after the
first, each is that user returning (a replica answers it from what it holds).

With `--rate`, unary runs are at that fixed rate (h2load `--rps`, 16 connections x 1 stream)
instead of as fast as possible: every setup does the same calls per second, and what differs is
the CPU each call takes, in all and on the server's main thread (the event loop, where all of its
Python runs; one worker saturates when that thread does). Steadier than calls/s at saturation,
which h2load, PostgreSQL and other work on these two cores move by 10% from run to run.
"""

from __future__ import annotations

import argparse
import contextlib
import operator
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2  # bench/load/h2.py
import run  # bench/load/run.py

ROOT = Path(__file__).resolve().parents[2]
TARGET_DIR = Path(tempfile.gettempdir()) / "allocsvc-ab-target"
SETUPS = ("echo", "this", "base")
WARMUP_S = 3.0


def find_maturin(parser: argparse.ArgumentParser) -> str:
    """maturin, to build a base: the venv's, even when not activated, else the PATH's."""
    beside = Path(sys.executable).with_name("maturin")
    found = str(beside) if beside.exists() else shutil.which("maturin")
    if found is None:
        parser.error("maturin is needed to build the base (pip install maturin)")
    return found


def invocation() -> str:
    """How this bench was run, as RESULTS.md quotes it: `python bench/load/<script> <args>`."""
    return " ".join(["python", f"bench/load/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def heading() -> str:
    """A bench's table heading: how it was run (`invocation`), and when."""
    return f"`{invocation()}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"


def turns(base_src: Path | None, rounds: int = 1, first: str = "this") -> Iterator[tuple[int, str]]:
    """(round from 1, setup) of this tree and, given its `src`, the base, `first` first in the
    first round and the order reversed each round after; the caller's work for each runs
    inside `serving_from` that setup's build."""
    for k in range(1, rounds + 1):
        names = ["this"] if base_src is None else [first, "base" if first == "this" else "this"]
        if k % 2 == 0:
            names.reverse()
        for name in names:
            with serving_from(base_src if name == "base" else None):
                yield k, name


@contextlib.contextmanager
def stores_and_base(
    prefix: str, base: str | None, parser: argparse.ArgumentParser
) -> Iterator[tuple[Path, Any, str, Path | None]]:
    """A work directory; `base`'s build in it (`base_tree`), when given; an embedded
    PostgreSQL and a redis-server (`run.stores`): (work, postgres, redis URL, base src)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        base_src = None
        if base:
            base_src = stack.enter_context(base_tree(base, work, find_maturin(parser)))
        postgres, redis = stack.enter_context(run.stores(work))
        yield work, postgres, redis, base_src


@contextlib.contextmanager
def base_tree(rev: str, workdir: Path, maturin: str) -> Iterator[Path]:
    """The `src` directory of `rev`, its Rust extension built in place."""
    tree = workdir / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
        check=True,
        capture_output=True,
    )
    try:
        wheels = workdir / "wheels"
        print(f"building {rev} with maturin (cargo target {TARGET_DIR})", file=sys.stderr)
        subprocess.run(
            [maturin, "build", "--release", "-q", "-o", str(wheels)],
            cwd=tree,
            env={**os.environ, "CARGO_TARGET_DIR": str(TARGET_DIR)},
            check=True,
            timeout=1800,
        )
        (wheel,) = wheels.glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            (core,) = [
                n
                for n in archive.namelist()
                if n.startswith("allocsvc/_core") and n.endswith(".so")
            ]
            (tree / "src" / core).write_bytes(archive.read(core))
        yield tree / "src"
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
            check=False,
            capture_output=True,
        )


@contextlib.contextmanager
def serving_from(src: Path | None) -> Iterator[None]:
    """Servers started inside run the package in `src` (a `base_tree`), or this tree's."""
    env = os.environ.copy()
    try:
        if src is not None:
            os.environ["PYTHONPATH"] = str(src)
        yield
    finally:
        os.environ.clear()
        os.environ.update(env)


def start(name: str, workdir: Path, base_src: Path, postgres: Any, redis: str = "") -> h2.Target:
    """Start `name` (echo, this, base): `--in-memory`, or on a database of `postgres`; with
    `redis` (a server's URL), sharing state through a database of its own there."""
    sub = workdir / name
    sub.mkdir()
    if name == "echo":
        return h2.start("echo", sub, None)
    with serving_from(base_src if name == "base" else None):
        if postgres is None:
            return h2.start("mem", sub, None)
        if redis:
            redis = f"{redis.rsplit('/', 1)[0]}/{SETUPS.index(name)}"
        return h2.start("w1", sub, postgres, database=f"ab_{name}", redis=redis)


def measure(
    args: argparse.Namespace, workdir: Path, base_src: Path, postgres: Any, redis: str = ""
) -> list[dict[str, Any]]:
    bodies = h2.grpc_body(workdir)
    if args.sticky:
        # One user in the sticky experiment: every call after the first is that user back.
        bodies = (h2.unary_body(workdir, run.EXPERIMENT)[0], *bodies[1:])
    unary = (
        h2.Shape(h2.CONNECTIONS, 1, rate=args.rate)
        if args.rate
        else h2.Shape(h2.CONNECTIONS, h2.ALTERNATING_STREAMS)
    )
    kinds = {
        "unary": (bodies[0], unary),
        "batch": (bodies[2], h2.Shape(*h2.BATCH_SHAPE, batch=h2.BATCH_ITEMS)),
    }
    targets: dict[str, h2.Target] = {}
    rows = []
    try:
        for name in SETUPS:
            targets[name] = start(name, workdir, base_src, postgres, redis)
        for target in targets.values():
            for kind in args.kinds:
                h2.run_h2load(args.h2load, target, *kinds[kind], WARMUP_S)
        for k in range(args.rounds):
            order = h2.rotated(SETUPS, k)
            for kind in args.kinds:
                for name in order:
                    print(f"round {k + 1}: {kind} {name}", file=sys.stderr)
                    h2.wait_quiet(targets[name], args.quiet_wait)
                    row = h2.run_h2load(args.h2load, targets[name], *kinds[kind], args.seconds)
                    rows.append({**row, "round": k + 1, "kind": kind, "setup": name})
                    ok = row["ok_per_s"] * (h2.BATCH_ITEMS if kind == "batch" else 1)
                    print(f"  {ok:,.0f} allocations/s OK, {row['detail']}", file=sys.stderr)
    finally:
        for target in targets.values():
            target.setup.stop()
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Command: `python bench/load/ab.py --base {args.base} --rounds {args.rounds} "
        f"--seconds {args.seconds:g} --kinds {','.join(args.kinds)}"
        f"{' --redis' if args.redis else ' --durable' if args.durable else ''}"
        f"{f' --rate {args.rate}' if args.rate else ''}{' --sticky' if args.sticky else ''}` "
        f"({args.started}). "
        f"`this`: the working tree; `base`: {args.base}; both "
        f"{'on the embedded PostgreSQL' if args.durable else '`--in-memory`'}"
        f"{', each sharing state through its own Redis database' if args.redis else ''}. "
        "Each run's allocations/s count the "
        "calls answered OK (batches x 1,000); server CPU is per call (per batch for batches), "
        "`main thread` its part on the server's main thread (the event loop).",
        "",
        "| round | kind | setup | calls/s | allocations/s | server CPU µs/call | "
        "main thread µs/call | server cores | pg cores | steal + other cores | errors |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        items = h2.BATCH_ITEMS if r["kind"] == "batch" else 1
        lines.append(
            f"| {r['round']} | {r['kind']} | {r['setup']} | {r['rps']:,.0f} | "
            f"{r['ok_per_s'] * items:,.0f} | {r['cpu_us_per_request']:,.0f} | "
            f"{r['loop_us_per_request']:,.0f} | {r['server_cores']:.2f} | "
            f"{r['postgres_cores']:.2f} | {h2._taken(r):.2f} | {r['errors']} |"
        )
    lines += ["", "| kind | figure | per round | median of uncontended rounds |"]
    lines.append("|---|---|---|---:|")
    for kind in args.kinds:
        picked = [r for r in rows if r["kind"] == kind]
        for label, name, base, key in (
            ("`this` / `base`, calls/s", "this", "base", "rps"),
            ("`this` / `base`, calls/s answered OK", "this", "base", "ok_per_s"),
            ("`this` / `base`, server CPU per call", "this", "base", "cpu_us_per_request"),
            ("`this` / `base`, main thread CPU per call", "this", "base", "loop_us_per_request"),
            ("`this` / echo, main thread CPU per call", "this", "echo", "loop_us_per_request"),
            ("`this` / echo, calls/s", "this", "echo", "rps"),
            ("`base` / echo, calls/s", "base", "echo", "rps"),
        ):
            ratios = h2.round_ratios(picked, name, base, operator.itemgetter(key))
            calm = [x for x, contended in ratios if not contended]
            shown = ", ".join(f"{x:.2f}{' (contended)' if c else ''}" for x, c in ratios)
            median = f"{statistics.median(calm):.2f}" if calm else "none uncontended"
            lines.append(f"| {kind} | {label} | {shown} | {median} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare with (any git rev)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--kinds", default="batch,unary", help="comma-separated: batch, unary")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each run, wait up to this long for other work to quiet down",
    )
    parser.add_argument(
        "--rate", type=int, default=0, help="unary calls per second (0: as fast as possible)"
    )
    parser.add_argument(
        "--durable",
        action="store_true",
        help="serve `this` and `base` on an embedded PostgreSQL instead of --in-memory",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="as --durable, and `this` and `base` each sharing state through Redis",
    )
    parser.add_argument(
        "--sticky",
        action="store_true",
        help="unary calls of one user in the sticky experiment (a returning user) instead of "
        "the non-sticky one",
    )
    args = parser.parse_args()
    args.durable = args.durable or args.redis
    args.kinds = [k for k in args.kinds.split(",") if k]
    if not set(args.kinds) <= {"batch", "unary"} or not args.kinds:
        parser.error("--kinds: batch and/or unary")
    args.maturin = find_maturin(parser)
    args.h2load = h2.find_h2load()
    args.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="allocsvc-ab-") as tmp:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            base_src = stack.enter_context(base_tree(args.base, workdir, args.maturin))
            postgres, redis = None, ""
            if args.durable:
                postgres, redis = stack.enter_context(run.stores(workdir))
            rows = measure(args, workdir, base_src, postgres, redis if args.redis else "")
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
