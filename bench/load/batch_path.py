"""Where AllocateBatch spends its CPU, in one process (issue 10), with no gRPC around it.

    python bench/load/batch_path.py [--items 1000] [--rounds 20] [--full-store 1000000]

Both handlers of the Allocator servicer on the same 1,000-item batch (5 variants, segmented by
source and device, an iPhone/Instagram context, a new user id per item, a non-sticky experiment,
the in-memory journal): the per-item Python path (parse the request with protobuf, allocate item
by item, build and serialize the response) and the bytes path (Rust decodes, checks, extracts,
decides, encodes and holds the new assignments; Python hands them to the journal whole). Also
the Rust steps alone, Rust's finish holding into a bounded store already full (every new
assignment evicts one, as in a server after warm-up; `--full-store 0` skips it), and the
write-behind's work on the rounds' new assignments as one block (`assignment_block`: what a
durable server's flush thread does under batch load). CPU time
(`time.process_time`) per item; prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import benchkit  # bench/load/benchkit.py

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import AllocationService
from allocsvc.api import convert
from allocsvc.api.allocator import AllocatorServicer
from allocsvc.config import ClusteringSettings, EmbeddingsSettings
from allocsvc.context import Extractor
from allocsvc.core import (
    Engine,
    HeldAssignments,
    MadeAssignments,
    assignment_block,
)
from allocsvc.learning.service import build_learning


async def measure(items: int, rounds: int, full_store: int, learning: bool) -> dict[str, Any]:
    service = AllocationService(Engine(), MemoryJournal(), Extractor())
    if learning:
        # As the server has it by default: a sample of the allocations feeds learning.
        service.attach_learning(build_learning(ClusteringSettings(), EmbeddingsSettings(), None))
    experiment = pb.Experiment(
        id="e",
        sticky=False,
        status=pb.EXPERIMENT_STATUS_RUNNING,
        variants=[pb.Variant(id=v) for v in "ABCDE"],
        segmentation=benchkit.manual_segmentation(),
    )
    await service.create_experiment(convert.experiment_from_pb(experiment))
    api = AllocatorServicer(service, "local")
    data = pb.AllocateBatchRequest(
        requests=[
            pb.AllocateRequest(experiment_id="e", user_id=f"u{i}", context=benchkit.CONTEXT)
            for i in range(items)
        ]
    ).SerializeToString()
    context: Any = None
    Extractor.warm_up()
    await api.AllocateBatchBytes(data, context)

    def per_item(seconds: float) -> float:
        return round(seconds / rounds / items * 1e6, 2)

    start = time.process_time()
    for _ in range(rounds):
        message = pb.AllocateBatchRequest.FromString(data)
        (await api.AllocateBatch(message, context)).SerializeToString()
    python_path = per_item(time.process_time() - start)
    start = time.process_time()
    for _ in range(rounds):
        await api.AllocateBatchBytes(data, context)
    bytes_path = per_item(time.process_time() - start)

    catalogue, engine = service._catalogue, service._engine
    start = time.process_time()
    prepared = [catalogue.prepare(data, 0) for _ in range(rounds)]
    rust_prepare = per_item(time.process_time() - start)

    def finish(p: Any, held: HeldAssignments, first_seq: int) -> MadeAssignments:
        _, made, _ = p.finish(
            engine,
            catalogue,
            held,
            region="local",
            id_prefix="x",
            first_seq=first_seq,
            now_ms=0,
            given={},
            errors={},
        )
        return made

    held = HeldAssignments("x")
    start = time.process_time()
    made = [finish(p, held, 1 + r * items) for r, p in enumerate(prepared)]
    rust_finish = per_item(time.process_time() - start)
    # The write-behind's thread under batch load: the rounds' assignments as one block
    # (compressed COPY rows and their filter), best of five.
    blocks = []
    for _ in range(5):
        start = time.process_time()
        assignment_block(made)
        blocks.append(time.process_time() - start)
    rust_finish_full = None
    if full_store:
        full = HeldAssignments("x", full_store)
        seq = 1
        while full.evictions == 0:
            finish(prepared[0], full, seq)
            seq += items
        start = time.process_time()
        for p in prepared:
            finish(p, full, seq)
            seq += items
        rust_finish_full = per_item(time.process_time() - start)
    return {
        "items": items,
        "learning": learning,
        "rounds": rounds,
        "us_per_item_python_path": python_path,
        "us_per_item_bytes_path": bytes_path,
        "speedup": round(python_path / bytes_path, 1),
        "us_per_item_rust_prepare": rust_prepare,
        "us_per_item_rust_finish": rust_finish,
        "us_per_item_rust_finish_full_store": rust_finish_full,
        "us_per_item_python_bookkeeping": round(bytes_path - rust_prepare - rust_finish, 2),
        "us_per_item_block": per_item(min(blocks)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--full-store",
        type=int,
        default=1_000_000,
        help="capacity of the full store finish holds into (0: skip)",
    )
    parser.add_argument(
        "--no-learning",
        action="store_true",
        help="no learning attached (the server attaches it: a sample of allocations feeds it)",
    )
    args = parser.parse_args()
    result = measure(args.items, args.rounds, args.full_store, not args.no_learning)
    print(json.dumps(asyncio.run(result)))


if __name__ == "__main__":
    main()
