"""Clustering: auto-k on four known user types, JSON round trip, serving = scikit-learn predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    silhouette_score,
)

from allocsvc.learning.clustering import AutoK, QualityGate, choose, fit_candidates, train
from allocsvc.learning.features import FeatureNormaliser, RawFeatures
from allocsvc.learning.model import ClusterModel

pytestmark = pytest.mark.unit


def four_user_types(n_per_type: int, seed: int) -> tuple[list[RawFeatures], np.ndarray]:
    """Rows of four kinds of users whose true type the test knows."""
    rng = np.random.default_rng(seed)
    rows: list[RawFeatures] = []
    labels: list[int] = []
    for _ in range(n_per_type):
        # 0: web visitors on phones from instagram in the evening, reading many pages.
        rows.append(
            RawFeatures(
                "web",
                "mobile",
                "instagram",
                int(rng.integers(19, 23)),
                int(rng.integers(0, 7)),
                pages_viewed=float(rng.normal(12, 1.5)),
                time_seconds=float(rng.normal(400, 40)),
            )
        )
        # 1: email readers on desktops in the morning, highly engaged.
        rows.append(
            RawFeatures(
                "email",
                "desktop",
                "email",
                int(rng.integers(7, 10)),
                int(rng.integers(0, 5)),
                engagement_score=float(rng.normal(0.8, 0.05)),
            )
        )
        # 2: funnel users on tablets at risk of dropping.
        rows.append(
            RawFeatures(
                "funnel",
                "tablet",
                "funnel_checkout",
                int(rng.integers(12, 15)),
                int(rng.integers(0, 7)),
                drop_risk=float(rng.normal(0.7, 0.05)),
            )
        )
        # 3: push openers on phones at weekends.
        rows.append(
            RawFeatures(
                "push",
                "mobile",
                "push",
                int(rng.integers(10, 13)),
                int(rng.integers(5, 7)),
                engagement_score=float(rng.normal(0.3, 0.05)),
            )
        )
        labels += [0, 1, 2, 3]
    return rows, np.array(labels)


def test_normaliser_output_shape_ranges_and_json_round_trip() -> None:
    rows, _ = four_user_types(50, seed=1)
    normaliser = FeatureNormaliser.fit(rows)
    matrix = normaliser.transform_many(rows)
    assert 15 <= normaliser.dimensions <= 20
    assert matrix.shape == (len(rows), normaliser.dimensions)
    assert len(normaliser.feature_names) == normaliser.dimensions
    lows = np.array([lo for lo, _ in normaliser.feature_ranges])
    highs = np.array([hi for _, hi in normaliser.feature_ranges])
    assert (matrix >= lows - 1e-12).all() and (matrix <= highs + 1e-12).all()
    again = FeatureNormaliser.from_json(json.loads(json.dumps(normaliser.to_json())))
    assert again == normaliser
    assert np.array_equal(again.transform_many(rows), matrix)
    # An unseen source goes to the "other" bucket; an unseen device to device=other.
    vector = normaliser.transform(RawFeatures("web", "unknown", "tiktok", 0, 0))
    names = normaliser.feature_names
    assert vector[names.index("source=other")] == 1.0
    assert vector[names.index("device=other")] == 1.0
    # A value beyond the training range is clipped to [0, 1].
    far = normaliser.transform(RawFeatures("web", "mobile", "x", 0, 0, pages_viewed=1e6))
    assert far[names.index("pages_viewed")] == 1.0


def test_auto_k_finds_the_four_user_types() -> None:
    rows, truth = four_user_types(150, seed=2)
    trained = train(rows, AutoK(seed=3), QualityGate())
    assert trained.model.k == 4
    assert trained.passed, trained.reasons
    labels = trained.model.assign_many(trained.model.normaliser.transform_many(rows))
    assert adjusted_rand_score(truth, labels) >= 0.9
    # Every k from 2 to 8 was tried and scored.
    assert [c["k"] for c in trained.model.metrics["candidates"]] == list(range(2, 9))


def test_metrics_are_scikit_learns_and_choice_agrees_with_them() -> None:
    rng = np.random.default_rng(4)
    centres = rng.uniform(0, 1, size=(3, 6))
    matrix = np.concatenate([c + rng.normal(0, 0.03, size=(80, 6)) for c in centres])
    candidates = fit_candidates(matrix, AutoK(k_max=5, seed=0))
    best = choose(candidates)
    assert best.k == 3
    assert best.silhouette == pytest.approx(silhouette_score(matrix, best.labels))
    assert best.davies_bouldin == pytest.approx(davies_bouldin_score(matrix, best.labels))
    assert best.calinski_harabasz == pytest.approx(calinski_harabasz_score(matrix, best.labels))


def test_silhouette_on_a_sample_for_large_data() -> None:
    rng = np.random.default_rng(5)
    matrix = np.concatenate([c + rng.normal(0, 0.05, size=(600, 4)) for c in np.eye(4)])
    candidates = fit_candidates(matrix, AutoK(k_min=4, k_max=4, silhouette_sample=500, seed=1))
    full = silhouette_score(matrix, candidates[0].labels)
    # A 500-row sample estimates the silhouette of 2400 rows closely, but it is a sample.
    assert candidates[0].silhouette == pytest.approx(full, abs=0.05)


def test_quality_gate_rejects_structureless_data() -> None:
    rng = np.random.default_rng(6)
    rows = [
        RawFeatures(
            "web",
            "mobile",
            "google",
            int(rng.integers(0, 24)),
            int(rng.integers(0, 7)),
            pages_viewed=float(rng.uniform(0, 10)),
            time_seconds=float(rng.uniform(0, 100)),
        )
        for _ in range(400)
    ]
    trained = train(rows, AutoK(seed=0), QualityGate(min_silhouette=0.5))
    assert not trained.passed
    assert any("silhouette" in reason for reason in trained.reasons)
    assert trained.model.metrics["quality_gate"]["passed"] is False


def test_json_round_trip_gives_identical_assignments() -> None:
    rows, _ = four_user_types(60, seed=7)
    model = train(rows, AutoK(seed=0), QualityGate()).model
    text = model.dumps()
    assert "pickle" not in text
    again = ClusterModel.loads(text)
    fresh, _ = four_user_types(40, seed=8)
    assert [model.assign(r) for r in fresh] == [again.assign(r) for r in fresh]
    assert again.metrics == json.loads(text)["metrics"]
    with pytest.raises(ValueError):
        ClusterModel.loads(json.dumps({**json.loads(text), "centroids": [[0.0, 1.0]]}))


def test_serving_assignment_equals_scikit_learn_predict() -> None:
    rows, _ = four_user_types(80, seed=9)
    normaliser = FeatureNormaliser.fit(rows)
    matrix = normaliser.transform_many(rows)
    km = KMeans(n_clusters=5, n_init=2, random_state=0).fit(matrix)
    model = ClusterModel(normaliser, km.cluster_centers_.astype(np.float64))
    fresh, _ = four_user_types(50, seed=10)
    fresh_matrix = normaliser.transform_many(fresh)
    expected = km.predict(fresh_matrix)
    assert [model.assign(r) for r in fresh] == expected.tolist()
    assert model.assign_many(fresh_matrix).tolist() == expected.tolist()
