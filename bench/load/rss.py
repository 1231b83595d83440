"""Resident memory of the allocation state (issue 10): 1,000 experiments x 1,000 segments x
5 variants of posterior counters, in the serving process's own structures.

    python bench/load/rss.py [--experiments 1000] [--segments 1000] [--variants 5]

Builds an `AllocationService` (the server's, with the in-memory journal) in a fresh process,
installs the experiments (segmented by source and device), then loads the counters the way a
start from the store does (`Engine.load_counts` in chunks, and the service's registry of known
segment keys), and reads VmRSS / VmHWM from /proc/self/status before and after. The counters
are in Rust; the segment-key registry is Python. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import benchkit  # bench/load/benchkit.py

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import AllocationService
from allocsvc.api import convert
from allocsvc.context import Extractor
from allocsvc.core import Engine, key_hash, path_keys

CHUNK_ROWS = 200_000


def _status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def _segment_keys(segments: int) -> list[str]:
    """`segments` distinct keys of a source x device tree, every level included."""
    keys = [""]
    source = 0
    while len(keys) < segments:
        for device in ("mobile", "desktop", "tablet"):
            for key in path_keys(["source", "device"], [f"s{source}", device])[1:]:
                if key not in keys[-4:]:
                    keys.append(key)
        source += 1
    return keys[:segments]


async def measure(experiments: int, segments: int, variants: int) -> dict[str, float]:
    service = AllocationService(Engine(), MemoryJournal(), Extractor())
    before = _status_kib("VmRSS")
    for e in range(experiments):
        message = pb.Experiment(
            id=f"exp-{e}",
            status=pb.EXPERIMENT_STATUS_RUNNING,
            variants=[pb.Variant(id=f"v{v}") for v in range(variants)],
            segmentation=benchkit.manual_segmentation(),
        )
        await service.create_experiment(convert.experiment_from_pb(message))
    keys = _segment_keys(segments)
    hashes = [key_hash(k) for k in keys]
    started = time.perf_counter()
    rows: list[tuple[int, int, int, int, int, float]] = []
    loaded = 0
    for handle in service.experiment_handles():
        for h in hashes:
            rows.extend((handle, h, v, 1000 + v, 50 + v, 0.0) for v in range(variants))
        if len(rows) >= CHUNK_ROWS:
            service.replace_counts(rows)
            loaded += len(rows)
            rows = []
        # What restore() does with the store's (experiment, segment key) pairs.
        service.restore([], [], [], ((handle, k) for k in keys))
    if rows:
        service.replace_counts(rows)
        loaded += len(rows)
    rows = []
    seconds = time.perf_counter() - started
    after = _status_kib("VmRSS")
    return {
        "experiments": experiments,
        "segments_per_experiment": segments,
        "variants": variants,
        "counters": loaded,
        "nodes": service._engine.node_count(),
        "load_seconds": round(seconds, 1),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "peak_kib": _status_kib("VmHWM"),
        "bytes_per_counter": round((after - before) * 1024 / max(loaded, 1), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument("--segments", type=int, default=1000)
    parser.add_argument("--variants", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.experiments, args.segments, args.variants))))


if __name__ == "__main__":
    main()
