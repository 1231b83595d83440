"""`run.py`'s rows on this tree and on a base commit's build, alternating (issue 10).

    python bench/load/run_ab.py --base REV [--setups redis2] [--rounds 2] [run.py options]

Each round runs `run.py --setups ... --no-write` (with `--quick` unless `--full`) once on each
build (ab.py's worktree for the base), the order reversed every other round: this, base, base,
this, ... Prints each run's table rows, labelled. Bounded: a `--quick` run of one setup is
about a minute.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import ab  # bench/load/ab.py
import run  # bench/load/run.py

HERE = Path(__file__).resolve().parent


def main() -> int:
    signal.signal(signal.SIGTERM, run._exit_on_sigterm)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--setups", default="redis2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="run.py's full plan, not --quick")
    args, rest = parser.parse_known_args()
    command = [sys.executable, str(HERE / "run.py"), "--setups", args.setups, "--no-write"]
    command += [] if args.full else ["--quick"]
    maturin = ab.find_maturin(parser)
    print(f"`{ab.invocation()}`")
    with (
        tempfile.TemporaryDirectory(prefix="allocsvc-run-ab-") as tmp,
        ab.base_tree(args.base, Path(tmp), maturin) as base_src,
    ):
        for k, name in ab.turns(base_src, args.rounds):
            done = subprocess.run([*command, *rest], capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            print(f"\nround {k}, {name}:", flush=True)
            rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
            print("\n".join(r for r in rows if r.split("|")[1].strip() in args.setups.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
