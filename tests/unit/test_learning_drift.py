"""Drift (PSI per feature) and staleness; a shifted distribution schedules a retrain."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from allocsvc.config import ClusteringSettings, EmbeddingsSettings
from allocsvc.context.extraction import ExtractedContext
from allocsvc.learning import drift
from allocsvc.learning.clustering import AutoK, QualityGate, train
from allocsvc.learning.features import RawFeatures
from allocsvc.learning.service import JobKind, Learning
from allocsvc.learning.store import MemoryModelStore

pytestmark = pytest.mark.unit


def test_psi_formula() -> None:
    expected = [0.25, 0.25, 0.5]
    actual = [0.5, 0.25, 0.25]
    by_hand = (0.5 - 0.25) * math.log(0.5 / 0.25) + (0.25 - 0.5) * math.log(0.25 / 0.5)
    assert drift.psi(expected, actual) == pytest.approx(by_hand)
    assert drift.psi(expected, expected) == 0.0
    # An empty bin is floored instead of making the index infinite.
    assert math.isfinite(drift.psi([1.0, 0.0], [0.0, 1.0]))


def test_histogram_shares() -> None:
    values = np.array([0.0, 0.05, 0.5, 0.99, 1.0, 2.0])
    shares = drift.histogram(values, 0.0, 1.0, bins=10)
    assert sum(shares) == pytest.approx(1.0)
    assert shares[0] == pytest.approx(2 / 6)
    assert shares[5] == pytest.approx(1 / 6)
    assert shares[9] == pytest.approx(3 / 6)  # 0.99, 1.0 and the clipped 2.0


def context(rng: np.random.Generator, *, shifted: bool) -> ExtractedContext:
    """Web traffic; shifted traffic comes from phones late at night and reads many pages."""
    if shifted:
        return ExtractedContext(
            "web", "google", "mobile", "us", int(rng.integers(0, 4)), int(rng.integers(0, 7)),
            False, pages_viewed=float(rng.uniform(15, 20)),
        )  # fmt: skip
    device = "desktop" if rng.random() < 0.7 else "mobile"
    return ExtractedContext(
        "web", "google" if rng.random() < 0.5 else "direct", device, "us",
        int(rng.integers(8, 20)), int(rng.integers(0, 7)), False,
        pages_viewed=float(rng.uniform(0, 10)),
    )  # fmt: skip


def learning(**overrides: object) -> Learning:
    settings = ClusteringSettings(
        min_samples=200, drift_min_samples=300, buffer_size=5000, **overrides
    )
    return Learning(settings, EmbeddingsSettings(), MemoryModelStore())


async def deploy(learn: Learning, rng: np.random.Generator) -> None:
    rows = [
        RawFeatures(*tuple(learn_row))
        for learn_row in (
            (c.channel, c.device, c.source, c.hour, c.day_of_week, c.pages_viewed)
            for c in (context(rng, shifted=False) for _ in range(1500))
        )
    ]
    trained = train(rows, AutoK(seed=0), QualityGate(min_silhouette=-1, max_davies_bouldin=99))
    stored = await learn._store.save(trained.model, deploy=True)
    learn._adopt(stored)


async def test_unshifted_traffic_does_not_schedule_a_retrain() -> None:
    rng = np.random.default_rng(1)
    learn = learning()
    await deploy(learn, rng)
    for i in range(1000):
        learn.observe(f"u{i}", context(rng, shifted=False))
    report = learn.measure_drift()
    assert report is not None and report.samples == 1000
    assert report.drift < 0.2
    assert not report.exceeded
    await learn.check()
    assert learn.latest_job(JobKind.CLUSTERS) is None
    assert learn.status().retrain_scheduled is False


async def test_shifted_traffic_crosses_the_threshold_and_schedules_a_retrain() -> None:
    rng = np.random.default_rng(2)
    learn = learning()
    await deploy(learn, rng)
    for i in range(1000):
        learn.observe(f"u{i}", context(rng, shifted=True))
    report = learn.measure_drift()
    assert report is not None and report.exceeded
    assert report.drift > 0.2
    # The features that moved are the ones that drift most.
    top = sorted(report.per_feature, key=report.per_feature.__getitem__)[-3:]
    assert set(top) & {"pages_viewed", "hour_sin", "hour_cos", "device=mobile"}
    await learn.check()
    job = learn.latest_job(JobKind.CLUSTERS)
    assert job is not None and job.reason == "drift"
    assert learn.status().retrain_scheduled is True
    await learn.close()  # cancels the training process


async def test_too_few_recent_rows_are_not_judged() -> None:
    rng = np.random.default_rng(3)
    learn = learning()
    await deploy(learn, rng)
    for i in range(100):
        learn.observe(f"u{i}", context(rng, shifted=True))
    assert learn.measure_drift() is None


async def test_threshold_is_configurable() -> None:
    rng = np.random.default_rng(4)
    learn = learning(drift_threshold=50.0)
    await deploy(learn, rng)
    for i in range(1000):
        learn.observe(f"u{i}", context(rng, shifted=True))
    report = learn.measure_drift()
    assert report is not None and report.drift > 0.2 and not report.exceeded


async def test_models_older_than_seven_days_are_stale() -> None:
    rng = np.random.default_rng(5)
    learn = learning()
    assert learn.stale() == (False, 0.0)
    await deploy(learn, rng)
    trained = learn.status().model
    assert trained is not None
    day = 86_400_000
    assert learn.stale(trained.model.trained_at_ms + 6 * day)[0] is False
    stale, age = learn.stale(trained.model.trained_at_ms + 8 * day)
    assert stale and age == pytest.approx(8.0)


async def test_serving_cluster_matches_the_model() -> None:
    rng = np.random.default_rng(6)
    learn = learning()
    ctx = context(rng, shifted=False)
    assert learn.cluster_of(ctx) == "none"
    await deploy(learn, rng)
    model = learn.status().model
    assert model is not None
    for _ in range(50):
        ctx = context(rng, shifted=False)
        row = RawFeatures(
            ctx.channel, ctx.device, ctx.source, ctx.hour, ctx.day_of_week, ctx.pages_viewed
        )
        vector = np.array([model.model.normaliser.transform(row)])
        assert learn.cluster_of(ctx) == str(int(model.model.assign_many(vector)[0]))


async def test_train_clusters_in_a_process_deploys_a_model() -> None:
    rng = np.random.default_rng(7)
    learn = learning(min_silhouette=-1.0, max_davies_bouldin=99.0, k_max=4)
    for i in range(600):
        learn.observe(f"u{i}", context(rng, shifted=i % 2 == 0))
    job = learn.train_clusters()
    assert learn.train_clusters() is job  # one clustering job at a time
    for _ in range(600):
        if job.state.value != "running":
            break
        await asyncio.sleep(0.1)
    assert job.state.value == "succeeded", job.message
    assert job.done == job.total == 3  # k = 2, 3, 4
    status = learn.status()
    assert status.model is not None and status.model.version == job.version == 1
    assert learn.cluster_of(context(rng, shifted=True)) != "none"
