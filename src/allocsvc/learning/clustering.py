"""Training k-means with k chosen automatically, and the quality gate (runs in a training process).

For every k in [k_min, k_max] k-means (scikit-learn, k-means++ starts) is fitted and scored by
- the silhouette coefficient (Rousseeuw 1987; higher is better, in [-1, 1]), on a random sample
  of at most `silhouette_sample` rows when the data is larger,
- the Davies–Bouldin index (Davies & Bouldin 1979; lower is better),
- the Calinski–Harabasz index (Caliński & Harabasz 1974; higher is better).
Each k gets its rank under each index; the k with the smallest sum of ranks wins, ties going to the
higher silhouette. The winner is deployed only if it passes the quality gate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.cluster import KMeans
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from allocsvc.learning import drift
from allocsvc.learning.features import FeatureNormaliser, RawFeatures
from allocsvc.learning.model import ClusterModel, EncoderSpec


@dataclass(frozen=True, slots=True)
class QualityGate:
    """What a model must reach to be deployed."""

    min_silhouette: float = 0.25
    max_davies_bouldin: float = 1.5
    # Every cluster must hold at least this share of the training rows.
    min_cluster_fraction: float = 0.01

    def check(self, metrics: dict[str, Any]) -> list[str]:
        """Reasons the model fails the gate (empty: it passes)."""
        reasons = []
        if metrics["silhouette"] < self.min_silhouette:
            reasons.append(f"silhouette {metrics['silhouette']:.3f} < {self.min_silhouette}")
        if metrics["davies_bouldin"] > self.max_davies_bouldin:
            reasons.append(
                f"Davies-Bouldin {metrics['davies_bouldin']:.3f} > {self.max_davies_bouldin}"
            )
        if metrics["smallest_cluster_fraction"] < self.min_cluster_fraction:
            reasons.append(
                f"smallest cluster holds {metrics['smallest_cluster_fraction']:.4f} of the rows"
                f" < {self.min_cluster_fraction}"
            )
        return reasons


@dataclass(frozen=True, slots=True)
class AutoK:
    k_min: int = 2
    k_max: int = 8
    silhouette_sample: int = 2000
    n_init: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.k_min <= self.k_max:
            raise ValueError(f"need 2 <= k_min <= k_max, got {self.k_min}, {self.k_max}")


@dataclass(frozen=True, slots=True)
class Candidate:
    k: int
    silhouette: float
    davies_bouldin: float
    calinski_harabasz: float
    inertia: float
    labels: npt.NDArray[np.int64]
    centroids: npt.NDArray[np.float64]

    def scores(self) -> dict[str, float]:
        return {
            "k": self.k,
            "silhouette": self.silhouette,
            "davies_bouldin": self.davies_bouldin,
            "calinski_harabasz": self.calinski_harabasz,
            "inertia": self.inertia,
        }


def fit_candidates(
    matrix: npt.NDArray[np.float64],
    auto: AutoK,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """k-means and its three indices for every k the data allows (k < number of distinct rows);
    `progress(done, total)` is called after each k."""
    distinct = len(np.unique(matrix, axis=0))
    rng = np.random.default_rng(auto.seed)
    sample = None
    if len(matrix) > auto.silhouette_sample:
        sample = rng.choice(len(matrix), auto.silhouette_sample, replace=False)
    candidates: list[Candidate] = []
    ks = range(auto.k_min, min(auto.k_max, distinct - 1) + 1)
    for k in ks:
        km = KMeans(n_clusters=k, n_init=auto.n_init, random_state=auto.seed).fit(matrix)
        labels = km.labels_.astype(np.int64)
        if sample is None:
            silhouette = silhouette_score(matrix, labels)
        else:
            silhouette = silhouette_score(matrix[sample], labels[sample])
        candidates.append(
            Candidate(
                k,
                float(silhouette),
                float(davies_bouldin_score(matrix, labels)),
                float(calinski_harabasz_score(matrix, labels)),
                float(km.inertia_),
                labels,
                np.asarray(km.cluster_centers_, dtype=np.float64),
            )
        )
        if progress is not None:
            progress(len(candidates), len(ks))
    return candidates


def choose(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate with the smallest sum of ranks under the three indices."""
    if not candidates:
        raise ValueError("no candidate k: the data has too few distinct rows")

    def ranks(values: list[float], higher_is_better: bool) -> list[int]:
        order = sorted(
            range(len(values)), key=lambda i: -values[i] if higher_is_better else values[i]
        )
        rank = [0] * len(values)
        for position, i in enumerate(order):
            rank[i] = position
        return rank

    sil = ranks([c.silhouette for c in candidates], True)
    db = ranks([c.davies_bouldin for c in candidates], False)
    ch = ranks([c.calinski_harabasz for c in candidates], True)
    best = min(
        range(len(candidates)),
        key=lambda i: (sil[i] + db[i] + ch[i], -candidates[i].silhouette),
    )
    return candidates[best]


@dataclass(frozen=True)
class TrainedClusters:
    model: ClusterModel
    passed: bool
    reasons: list[str]


def train_matrix(
    matrix: npt.NDArray[np.float64],
    normaliser: FeatureNormaliser,
    auto: AutoK,
    gate: QualityGate,
    progress: Callable[[int, int], None] | None = None,
    *,
    features: npt.NDArray[np.float64] | None = None,
    encoder: EncoderSpec | None = None,
) -> TrainedClusters:
    """Choose k, fit, score and gate a model over an already-normalised matrix. With an
    `encoder`, `matrix` holds its embeddings of `features`, the normalised feature rows (drift
    is measured on those)."""
    candidates = fit_candidates(matrix, auto, progress)
    best = choose(candidates)
    sizes = np.bincount(best.labels, minlength=best.k)
    metrics: dict[str, Any] = {
        **best.scores(),
        "cluster_sizes": [int(s) for s in sizes],
        "smallest_cluster_fraction": float(sizes.min() / len(matrix)),
        "candidates": [c.scores() for c in candidates],
        "silhouette_sample": min(len(matrix), auto.silhouette_sample),
    }
    reasons = gate.check(metrics)
    metrics["quality_gate"] = {"passed": not reasons, "reasons": reasons}
    model = ClusterModel(
        normaliser,
        best.centroids,
        metrics,
        drift.reference(matrix if features is None else features, normaliser.feature_ranges),
        samples=len(matrix),
        trained_at_ms=time.time_ns() // 1_000_000,
        seed=auto.seed,
        encoder=encoder,
    )
    return TrainedClusters(model, not reasons, reasons)


def train(
    rows: Sequence[RawFeatures],
    auto: AutoK,
    gate: QualityGate,
    max_sources: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> TrainedClusters:
    """Fit the normaliser on `rows`, then choose k, fit and gate."""
    normaliser = FeatureNormaliser.fit(rows, max_sources)
    return train_matrix(normaliser.transform_many(rows), normaliser, auto, gate, progress)
