"""Observing allocations for learning is sampled and conditional; nearest-centroid serving
equals a NumPy argmin; the serving path imports neither torch nor scikit-learn."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import numpy as np
import pytest

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import AllocationService
from allocsvc.api import convert
from allocsvc.api.allocator import BATCH_OBSERVED_ITEMS, AllocatorServicer
from allocsvc.config import ClusteringSettings, EmbeddingsSettings
from allocsvc.context import Extractor
from allocsvc.core import Engine
from allocsvc.learning.features import FeatureNormaliser, RawFeatures
from allocsvc.learning.model import ClusterModel
from allocsvc.learning.sampling import ObservationGaps
from allocsvc.learning.service import Learning
from allocsvc.learning.store import MemoryModelStore

pytestmark = pytest.mark.unit


def test_gaps_average_every_and_cover_their_range() -> None:
    gaps = ObservationGaps(10, seed=3)
    drawn = np.array([gaps.next() for _ in range(20_000)])
    assert drawn.min() == 1 and drawn.max() == 19
    # Uniform on 1..19: mean 10, standard deviation sqrt((19² - 1) / 12).
    standard_error = math.sqrt((19**2 - 1) / 12) / math.sqrt(len(drawn))
    assert abs(drawn.mean() - 10) < 5 * standard_error
    assert [ObservationGaps(1).next() for _ in range(5)] == [1] * 5
    with pytest.raises(ValueError, match="every"):
        ObservationGaps(0)


def test_batch_samples_hold_items_over_every_at_random_positions() -> None:
    gaps = ObservationGaps(7, seed=5)
    draws = [gaps.sample(100, 1000) for _ in range(3000)]
    # 100 / 7 = 14.29: 14 or 15 positions, 15 about 29% of the time, so the mean is exact.
    counts = np.array([len(d) for d in draws])
    assert set(counts) == {14, 15}
    assert abs(counts.mean() - 100 / 7) < 5 * counts.std() / math.sqrt(len(counts))
    assert all(d == sorted(set(d)) and d[0] >= 0 and d[-1] < 100 for d in draws)
    # Every position is drawn about as often (3000 x 14.29 / 100 = 429 times each).
    hits = np.bincount(np.concatenate(draws), minlength=100)
    assert hits.min() > 300 and hits.max() < 560
    assert len(gaps.sample(1000, 8)) == 8
    assert ObservationGaps(1).sample(4, 10) == [0, 1, 2, 3]


def learning(every: int, *, clustering: bool = True, embeddings: bool = True) -> Learning:
    return Learning(
        ClusteringSettings(enabled=clustering, observe_every=every, buffer_size=100_000),
        EmbeddingsSettings(enabled=embeddings),
        MemoryModelStore(),
    )


async def service_with(learn: Learning) -> AllocationService:
    service = AllocationService(Engine(), MemoryJournal(), Extractor())
    service.attach_learning(learn)
    await service.create_experiment(
        convert.experiment_from_pb(
            pb.Experiment(
                id="exp",
                status=pb.EXPERIMENT_STATUS_RUNNING,
                variants=[pb.Variant(id="A"), pb.Variant(id="B")],
                sticky=False,
            )
        )
    )
    return service


def request(i: int) -> pb.AllocateRequest:
    return pb.AllocateRequest(
        experiment_id="exp",
        user_id=f"u{i}",
        channel="web",
        context={"utm_source": "google"},
        signals={"pages_viewed": float(i % 9)},
    )


async def test_unary_allocations_are_observed_about_one_in_every() -> None:
    every, n = 10, 5000
    learn = learning(every)
    service = await service_with(learn)
    for i in range(n):
        await service.allocate(convert.allocate_request(request(i)))
    observed = len(learn._buffer)
    assert abs(observed - n / every) < 5 * count_spread(n, every)
    assert {user for user, _ in learn._buffer} <= {f"u{i}" for i in range(n)}


async def test_wire_allocations_are_observed_about_one_in_every() -> None:
    # Counted down in Rust (`UnaryLane`) for the calls it answers whole.
    every, n = 10, 5000
    learn = learning(every)
    service = await service_with(learn)
    for i in range(n):
        assert service.allocate_wire(request(i).SerializeToString(), "") is not None
    observed = len(learn._buffer)
    assert abs(observed - n / every) < 5 * count_spread(n, every)
    assert {user for user, _ in learn._buffer} <= {f"u{i}" for i in range(n)}


async def test_wire_and_decoded_calls_count_down_to_the_same_sample() -> None:
    learn = learning(1)
    service = await service_with(learn)
    for i in range(300):
        if i % 3:
            assert service.allocate_wire(request(i).SerializeToString(), "") is not None
        else:
            await service.allocate(convert.allocate_request(request(i)))
    assert [user for user, _ in learn._buffer] == [f"u{i}" for i in range(300)]


async def test_a_sampled_wire_call_is_observed_with_the_features_rust_extracted() -> None:
    # The call's own features come back with its answer (no second decode): those
    # `features_one` gives the same request, sticky answers included.
    learn = learning(1)
    service = await service_with(learn)
    sticky = convert.experiment_from_pb(
        pb.Experiment(
            id="sticky",
            status=pb.EXPERIMENT_STATUS_RUNNING,
            variants=[pb.Variant(id="A"), pb.Variant(id="B")],
            sticky=True,
        )
    )
    await service.create_experiment(sticky)
    now = int(time.time() * 1000)
    raws = []
    for i in range(40):
        message = request(i)
        message.timestamp_unix_ms = now
        message.channel = ("web", "email", "push")[i % 3]
        message.context["user_agent"] = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)"
        if i >= 20:  # u0-u9 twice in a sticky experiment: then answered their assignment
            message.experiment_id = "sticky"
            message.user_id = f"u{i % 10}"
        raws.append(message.SerializeToString())
    answers = [service.allocate_wire(raw, "") for raw in raws]
    ids = [pb.AllocateResponse.FromString(a).assignment_id for a in answers if a is not None]
    assert len(ids) == len(raws)
    assert ids[30:] == ids[20:30]
    expected = [service._catalogue.features_one(raw, now) for raw in raws]
    assert list(learn._buffer) == [(row[0], RawFeatures._make(row[1:])) for row in expected if row]
    assert len(learn._buffer) == len(raws)
    assert {row.channel for _, row in learn._buffer} == {"web", "email", "push"}


def count_spread(n: int, every: int) -> float:
    """Standard deviation of the number of observations in n requests: a renewal count, with
    gaps of mean `every` and variance ((2·every − 1)² − 1) / 12, spreads sqrt(n·var/every³)."""
    return math.sqrt(n * ((2 * every - 1) ** 2 - 1) / 12 / every**3)


async def test_every_one_observes_every_allocation() -> None:
    learn = learning(1)
    service = await service_with(learn)
    for i in range(300):
        await service.allocate(convert.allocate_request(request(i)))
    assert [user for user, _ in learn._buffer] == [f"u{i}" for i in range(300)]


async def test_nothing_is_observed_when_clustering_and_embeddings_are_off() -> None:
    learn = learning(1, clustering=False, embeddings=False)
    assert learn.gaps is None
    service = await service_with(learn)
    assert not service.learns
    for i in range(200):
        await service.allocate(convert.allocate_request(request(i)))
    assert len(learn._buffer) == 0
    # Embeddings alone still need the sample.
    assert learning(1, clustering=False).gaps is not None


async def _observed_in_batches(every: int, batches: int, size: int) -> Learning:
    learn = learning(every)
    service = await service_with(learn)
    servicer = AllocatorServicer(service, "local")
    for b in range(batches):
        message = pb.AllocateBatchRequest(
            requests=[request(b * size + i) for i in range(size)]
        ).SerializeToString()
        reply = pb.AllocateBatchResponse.FromString(
            await servicer.AllocateBatchBytes(message, None)  # type: ignore[arg-type]
        )
        assert all(r.WhichOneof("outcome") == "allocation" for r in reply.results)
    return learn


async def test_batches_over_the_fast_path_are_sampled_the_same_way() -> None:
    # About 6 of each 100-item batch: under the per-batch cap, as unary calls are sampled.
    every, batches, size = 16, 40, 100
    n = batches * size
    learn = await _observed_in_batches(every, batches, size)
    assert abs(len(learn._buffer) - n / every) < 5 * count_spread(n, every)
    # Each row is its own item's (Rust's extraction of it).
    for user, row in learn._buffer:
        i = int(user[1:])
        assert (row.channel, row.device, row.source) == ("web", "unknown", "google")
        assert row.pages_viewed == float(i % 9) and row.time_seconds is None


async def test_a_batch_feeds_learning_at_most_the_cap() -> None:
    # Every item sampled (every=1), then BATCH_OBSERVED_ITEMS of each batch kept.
    learn = await _observed_in_batches(1, 5, 100)
    users = [int(user[1:]) for user, _ in learn._buffer]
    assert len(users) == 5 * BATCH_OBSERVED_ITEMS
    assert [u // 100 for u in users] == [b for b in range(5) for _ in range(BATCH_OBSERVED_ITEMS)]
    assert len(set(users)) == len(users)


async def test_unary_calls_over_the_bytes_path_are_sampled_one_in_every() -> None:
    every, n = 10, 3000
    learn = learning(every)
    servicer = AllocatorServicer(await service_with(learn), "local")
    for i in range(n):
        await servicer.AllocateBytes(request(i).SerializeToString(), None)  # type: ignore[arg-type]
    assert abs(len(learn._buffer) - n / every) < 5 * count_spread(n, every)
    user, row = learn._buffer[0]
    assert row.pages_viewed == float(int(user[1:]) % 9)


def test_serving_assignment_equals_numpy_argmin() -> None:
    rng = np.random.default_rng(11)
    rows = [
        RawFeatures(
            str(rng.choice(["web", "email", "push"])),
            str(rng.choice(["mobile", "desktop"])),
            str(rng.choice(["google", "direct", "x"])),
            int(rng.integers(0, 24)),
            int(rng.integers(0, 7)),
            float(rng.uniform(0, 20)),
        )
        for _ in range(2000)
    ]
    normaliser = FeatureNormaliser.fit(rows)
    model = ClusterModel(normaliser, rng.uniform(-0.5, 1, size=(8, normaliser.dimensions)))
    matrix = normaliser.transform_many(rows)
    distances = ((matrix[:, None, :] - model.centroids[None, :, :]) ** 2).sum(axis=2)
    assert [model.assign(r) for r in rows] == np.argmin(distances, axis=1).tolist()
    assert model.assign_many(matrix).tolist() == np.argmin(distances, axis=1).tolist()


def test_the_serving_path_imports_neither_torch_nor_scikit_learn() -> None:
    code = (
        "import sys\n"
        "import allocsvc.server, allocsvc.learning.service, allocsvc.metrics\n"
        "heavy = [m for m in ('torch', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
