"""Allocate latency while a clustering job trains, against idle, in one run (issue 7).

Starts `allocsvc serve --in-memory`, fills its traffic sample with 20,000 requests of four user
kinds (AllocateBatch), then measures sequential unary Allocate calls from one client:
idle, while TrainClusters runs (k = 2..8 over 20,000 rows, in the training process), and idle
again. Then times the learning pieces of the hot path in this process (timeit, best of 5):
nearest centroid with NumPy against `math.dist` over tuples, and what observing for learning
adds to an allocation, sampled and not. Prints Markdown tables, and with --write replaces this
benchmark's section of bench/RESULTS.md.

    python bench/learning_latency.py [--calls 3000] [--write]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from load import benchkit  # bench/load/benchkit.py

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

SECTION = "## Learning in the background (issue 7)"
SAMPLE_ROWS = 20_000
CONTEXTS = [
    ("web", {"device": "mobile", "utm_source": "instagram"}, {"pages_viewed": 12.0}),
    ("email", {"device": "desktop", "list_id": "news"}, {"engagement_score": 0.8}),
    ("funnel", {"device": "tablet", "funnel_id": "checkout"}, {"drop_risk": 0.7}),
    ("push", {"device": "mobile", "campaign_id": "sale"}, {"engagement_score": 0.3}),
]


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    log = tmp / "server.log"
    env = {
        **os.environ,
        "ALLOCSVC_CLUSTERING__BUFFER_SIZE": str(SAMPLE_ROWS),
        # Every allocation feeds the sample (the default keeps one in ten): quicker to fill,
        # and the latencies below include observing on every call.
        "ALLOCSVC_CLUSTERING__OBSERVE_EVERY": "1",
    }
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "allocsvc",
                "serve",
                "--in-memory",
                "--port",
                "0",
                "--seed",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        serving = benchkit.log_entry(log, "serving")
        if serving:
            return proc, int(serving["port"]), log
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"server did not start:\n{log.read_text()}")


def request(rng: np.random.Generator, user: str) -> pb.AllocateRequest:
    channel, context, signals = CONTEXTS[int(rng.integers(len(CONTEXTS)))]
    noisy = {k: float(v * rng.uniform(0.8, 1.2)) for k, v in signals.items()}
    return pb.AllocateRequest(
        experiment_id="bench-auto", user_id=user, channel=channel, context=context, signals=noisy
    )


def measure(
    stub: pb_grpc.AllocatorStub, calls: int, rng: np.random.Generator, tag: str
) -> list[float]:
    latencies = []
    for i in range(calls):
        req = request(rng, f"{tag}-{i}")
        t0 = time.perf_counter_ns()
        stub.Allocate(req, timeout=10)
        latencies.append((time.perf_counter_ns() - t0) / 1e6)
    return latencies


def row(name: str, ms: list[float], idle_p99: float) -> str:
    p50, p99 = np.percentile(ms, [50, 99])
    return f"| {name} | {len(ms)} | {p50:.3f} | {p99:.3f} | {p99 / idle_p99:.2f} |"


def best_ns(function: Any, number: int) -> float:
    """Best of five timeit runs, nanoseconds per call."""
    return min(timeit.repeat(function, number=number, repeat=5)) / number * 1e9


def nearest_centroid_table() -> str:
    """One nearest-centroid lookup, 8 centroids of the 20 features: NumPy vs math.dist."""
    from allocsvc.learning.features import FeatureNormaliser, RawFeatures
    from allocsvc.learning.model import ClusterModel

    rng = np.random.default_rng(3)
    row = RawFeatures("web", "mobile", "google", 20, 3, 12.0)
    normaliser = FeatureNormaliser.fit([row, RawFeatures("email", "desktop", "x", 8, 1, 0.0)])
    model = ClusterModel(normaliser, rng.uniform(0, 1, size=(8, normaliser.dimensions)))
    centroids, vector = model.centroids, normaliser.transform(row)
    tuples = [tuple(c) for c in centroids.tolist()]

    def with_numpy() -> int:
        diff = centroids - np.asarray(vector, dtype=np.float64)
        return int(np.argmin(np.einsum("ij,ij->i", diff, diff)))

    def with_math_dist() -> int:
        best, nearest = math.inf, 0
        for i, centroid in enumerate(tuples):
            distance = math.dist(vector, centroid)
            if distance < best:
                best, nearest = distance, i
        return nearest

    assert with_numpy() == with_math_dist() == model.assign(row)
    numpy_ns = best_ns(with_numpy, 20_000)
    dist_ns = best_ns(with_math_dist, 20_000)
    assign_ns = best_ns(lambda: model.assign(row), 20_000)
    return "\n".join(
        [
            "| nearest centroid (k = 8, 20 features) | ns per call | vs NumPy |",
            "|---|---:|---:|",
            f"| NumPy: subtract, einsum, argmin | {numpy_ns:.0f} | 1.00 |",
            f"| `math.dist` over centroid tuples (kept) | {dist_ns:.0f} |"
            f" {dist_ns / numpy_ns:.2f} |",
            f"| whole `ClusterModel.assign` (transform + math.dist) | {assign_ns:.0f} |"
            f" {assign_ns / numpy_ns:.2f} |",
        ]
    )


def observe_table() -> str:
    """What learning adds to one allocation: the sampled call (`Learning.observe` of an
    extracted context) and the countdown every allocation runs (the same statements as
    `AllocationService.allocate`). A whole in-process allocation is tens of microseconds on
    this shared machine, too noisy to show a difference of this size, so the parts are timed."""
    from allocsvc.config import ClusteringSettings, EmbeddingsSettings
    from allocsvc.context import Extractor
    from allocsvc.learning.sampling import ObservationGaps
    from allocsvc.learning.service import Learning
    from allocsvc.learning.store import MemoryModelStore

    learn = Learning(ClusteringSettings(), EmbeddingsSettings(), MemoryModelStore())
    channel, context, signals = CONTEXTS[0]
    extracted = Extractor().extract(channel, context, signals, 1_704_067_200_000)
    observe_ns = best_ns(lambda: learn.observe("user", extracted), 50_000)

    class Countdown:
        def __init__(self, every: int) -> None:
            self.gaps = ObservationGaps(every)
            self.until = self.gaps.next()

        def step(self) -> None:
            self.until -= 1
            if self.until <= 0:
                self.until = self.gaps.next()
                learn.observe("user", extracted)

    rows = []
    for every in (1, 10, 100):
        countdown = Countdown(every)
        rows.append((every, best_ns(countdown.step, 200_000)))
    return "\n".join(
        [
            "| learning's part of one allocation | ns |",
            "|---|---:|",
            f"| `Learning.observe` (one sampled allocation) | {observe_ns:.0f} |",
            *(
                f"| countdown + sampled observe, `observe_every: {every}` (per allocation) |"
                f" {ns:.0f} |"
                for every, ns in rows
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="idle calls per idle phase")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, _ = start_server(Path(tmp))
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            admin = pb_grpc.AdminStub(channel)
            stub = pb_grpc.AllocatorStub(channel)
            admin.CreateExperiment(
                pb.CreateExperimentRequest(
                    experiment=pb.Experiment(
                        id="bench-auto",
                        name="bench-auto",
                        status=pb.EXPERIMENT_STATUS_RUNNING,
                        variants=[pb.Variant(id=v, name=v) for v in ("A", "B", "C")],
                        segmentation=pb.SegmentationConfig(mode=pb.SEGMENTATION_MODE_AUTO),
                    )
                ),
                timeout=10,
            )
            for start in range(0, SAMPLE_ROWS, 500):
                stub.AllocateBatch(
                    pb.AllocateBatchRequest(
                        requests=[request(rng, f"fill-{start + i}") for i in range(500)]
                    ),
                    timeout=30,
                )
            measure(stub, 500, rng, "warm")
            idle = measure(stub, args.calls, rng, "idle")
            job = admin.TrainClusters(pb.TrainClustersRequest(), timeout=10)
            training: list[float] = []
            started = time.monotonic()
            state = "running"
            while state == "running":
                training += measure(stub, 200, rng, f"train{len(training)}")
                state = admin.GetClusteringStatus(
                    pb.GetClusteringStatusRequest(job_id=job.job_id), timeout=10
                ).job.state
            train_seconds = time.monotonic() - started
            idle_after = measure(stub, args.calls, rng, "after")
            status = admin.GetClusteringStatus(pb.GetClusteringStatusRequest(), timeout=10)
            channel.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    idle_p99 = float(np.percentile(idle, 99))
    table = "\n".join(
        [
            "| phase | calls | p50 ms | p99 ms | p99 / idle p99 |",
            "|---|---:|---:|---:|---:|",
            row("idle (before)", idle, idle_p99),
            row("clustering job running", training, idle_p99),
            row("idle (after; auto segments live)", idle_after, idle_p99),
        ]
    )
    text = (
        f"{SECTION}\n\n"
        "Command: `python bench/learning_latency.py --write`. Unary Allocate, one sequential"
        " client, in-memory server, an `auto` experiment; the training sample holds"
        f" {SAMPLE_ROWS:,} requests. The clustering job (k = 2..8, job {status.job.state},"
        f" chosen k = {status.k}) ran"
        f" {train_seconds:.1f} s in its own process (nice +10, one math thread).\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs,"
        f" Python {platform.python_version()}.\n\n"
        f"{table}\n"
    )
    text += (
        "\nLearning pieces of the hot path, in this process (timeit, best of 5). Serving keeps"
        " the faster nearest-centroid lookup; an allocation that is not sampled pays one"
        " counter decrement.\n\n"
        f"{nearest_centroid_table()}\n\n{observe_table()}\n"
    )
    print(text)
    if args.write:
        benchkit.write_section(SECTION, text)


if __name__ == "__main__":
    main()
