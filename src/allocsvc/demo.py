"""A short run of the Rust core: `python -m allocsvc.demo`.

Configures a 3-variant experiment segmented by device, simulates users whose conversion rates
make a different variant best on each device, and prints how the last decisions were shared out
and which cascade level made them. A command-line demo, so it writes to stdout.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence

from allocsvc.core import Engine, seed_rng

EXPERIMENT = 1
VARIANTS = ("A", "B", "C")
# True conversion rate of each variant per device: the best one differs by device.
RATES = {
    "mobile": (0.04, 0.09, 0.05),
    "desktop": (0.11, 0.06, 0.07),
    "tablet": (0.05, 0.06, 0.10),
}
# Share of traffic per device.
TRAFFIC = {"mobile": 0.6, "desktop": 0.3, "tablet": 0.1}
MIN_SAMPLES = 200


def run(users: int, last: int, seed: int) -> str:
    """Simulate `users` decisions and return the report."""
    seed_rng(seed)
    rng = random.Random(seed)
    engine = Engine()
    engine.configure(
        EXPERIMENT, variants=len(VARIANTS), dimensions=["device"], min_samples=[MIN_SAMPLES]
    )
    devices = list(TRAFFIC)
    weights = list(TRAFFIC.values())
    shares: dict[str, Counter[int]] = {d: Counter() for d in devices}
    levels: Counter[int] = Counter()
    all_levels: Counter[int] = Counter()
    conversions = 0
    started = time.perf_counter()
    for t in range(users):
        device = rng.choices(devices, weights)[0]
        variant, level, _propensity, key = engine.decide(EXPERIMENT, f"user-{t}", [device])
        if rng.random() < RATES[device][variant]:
            engine.record_conversion(EXPERIMENT, key, variant, 1.0)
            conversions += 1
        all_levels[level] += 1
        if t >= users - last:
            shares[device][variant] += 1
            levels[level] += 1
    elapsed = time.perf_counter() - started

    lines = [
        f"allocsvc core demo: {users:,} users, 3 variants, segmented by device (seed {seed})",
        f"cascade: global (level 0) until a device has {MIN_SAMPLES} allocations, then the device"
        " (level 1)",
        "",
        f"true rates {' '.join(f'{v:>7}' for v in VARIANTS)}   best",
    ]
    for device in devices:
        rates = RATES[device]
        best = VARIANTS[rates.index(max(rates))]
        lines.append(f"  {device:<8} {' '.join(f'{r:>7.1%}' for r in rates)}   {best}")
    lines += ["", f"share of the last {last:,} decisions per device"]
    for device in devices:
        counts = shares[device]
        n = sum(counts.values())
        cells = " ".join(f"{counts[v] / n if n else 0.0:>7.1%}" for v in range(len(VARIANTS)))
        lines.append(f"  {device:<8} {cells}   ({n:,} users)")
    lines += [
        "",
        "cascade level of the decisions (0 = global, 1 = device)",
        f"  all {users:,}: {format_levels(all_levels)}",
        f"  last {last:,}: {format_levels(levels)}",
        "",
        f"conversion rate {conversions / users:.2%} (best fixed variant per device: "
        f"{sum(TRAFFIC[d] * max(RATES[d]) for d in devices):.2%}, uniform random: "
        f"{sum(TRAFFIC[d] * sum(RATES[d]) / len(VARIANTS) for d in devices):.2%})",
        f"{users:,} decisions and their conversions in {elapsed:.2f} s from Python",
    ]
    return "\n".join(lines) + "\n"


def format_levels(levels: Counter[int]) -> str:
    total = sum(levels.values())
    return ", ".join(f"level {lvl}: {n / total:.1%}" for lvl, n in sorted(levels.items()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m allocsvc.demo", description=__doc__)
    parser.add_argument("--users", type=int, default=20_000, help="simulated users")
    parser.add_argument("--last", type=int, default=2_000, help="decisions to report shares of")
    parser.add_argument("--seed", type=int, default=7, help="seed of every random choice")
    args = parser.parse_args(argv)
    if args.users < 1 or not 0 < args.last <= args.users:
        parser.error("need users >= 1 and 0 < last <= users")
    sys.stdout.write(run(args.users, args.last, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
