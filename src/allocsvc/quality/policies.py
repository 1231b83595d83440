"""The allocation policies compared by the simulator, as experiments the Rust core runs.

Every policy but the oracle is an `Experiment` handed to `allocsvc.core.Engine` the way the
allocation service installs one (`AllocationService._install`), so the simulator exercises the
real cascade, warm start, exploration bonus and propensities. The oracle knows the truth and is
the reference that regret is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from allocsvc.allocation.experiments import (
    Experiment,
    Exploration,
    Hierarchy,
    Policy,
    Segmentation,
    SegmentationMode,
    Variant,
)
from allocsvc.quality.scenarios import FloatArray, IntArray

# The cascade's minimum allocations per level (country, country|device, country|device|source).
CASCADE_MIN_SAMPLES = (1000, 500, 200)
CLUSTER_MIN_SAMPLES = 500
# Propensity floor of `cascade_floor`: with 3 variants it spends 3% of traffic evenly on the
# variants (at most ~1.5% of it on worse ones than the segment's best), and bounds every
# inverse propensity weight by 100, where the plain cascade's reach ~10^6.
CASCADE_FLOOR = 0.01
SILHOUETTE_SAMPLE = 600


class Context(StrEnum):
    """What a policy's decision is keyed by."""

    NONE = "none"  # global: one posterior for everybody
    SEGMENTS = "segments"  # the scenario's dimensions, cascaded level by level
    FLAT = "flat"  # one posterior per leaf segment, no hierarchy
    CLUSTER = "cluster"  # the user's cluster id from a k-means model (auto mode)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """One compared policy. `experiment` is None for the oracle.

    With `tree`, the segment tree is rebuilt and pruned during the run, as the server's
    `tree-rebuild` and `tree-rebuild-growth` tasks do (`build_tree` over the engine's counts,
    then `set_tree`), and until the first tree only the global node serves. Without, no tree is
    ever set: every node with its level's minimum may serve.
    """

    name: str
    description: str
    context: Context
    experiment: Experiment | None
    tree: bool = False


def _experiment(
    name: str,
    variants: int,
    *,
    policy: Policy = Policy.THOMPSON,
    dimensions: tuple[str, ...] = (),
    min_samples: tuple[int, ...] = (),
    warm_start: float = 10.0,
    exploration: Exploration = Exploration.DEFAULT,
    propensity_floor: float = 0.0,
    auto: bool = False,
) -> Experiment:
    if auto:
        segmentation = Segmentation(mode=SegmentationMode.AUTO)
    elif dimensions:
        segmentation = Segmentation(mode=SegmentationMode.MANUAL, segment_by=dimensions)
    else:
        segmentation = Segmentation()
    return Experiment(
        key=f"sim-{name}",
        name=name,
        variants=tuple(Variant(key=f"v{i}", name=f"v{i}") for i in range(variants)),
        policy=policy,
        segmentation=segmentation,
        hierarchy=Hierarchy(min_samples_per_level=min_samples, warm_start_strength=warm_start),
        exploration=exploration,
        propensity_floor=propensity_floor,
        sticky=False,
        handle=1,
    )


def standard_policies(dimensions: tuple[str, ...], variants: int) -> dict[str, PolicySpec]:
    """The policies of the comparison, by name, for a scenario's dimensions."""
    cascade_min = CASCADE_MIN_SAMPLES[: len(dimensions)]
    specs = [
        PolicySpec(
            "oracle", "knows every user's true rates; regret 0 by definition", Context.NONE, None
        ),
        PolicySpec(
            "uniform",
            "plain A/B split by user-id hash",
            Context.NONE,
            _experiment("uniform", variants, policy=Policy.UNIFORM),
        ),
        PolicySpec(
            "global_ts",
            "Thompson sampling, one posterior for everybody (exploration default)",
            Context.NONE,
            _experiment("global_ts", variants),
        ),
        PolicySpec(
            "flat_ts",
            "Thompson sampling per leaf segment from a cold Beta(1,1), no hierarchy",
            Context.FLAT,
            _experiment(
                "flat_ts", variants, dimensions=("segment",), min_samples=(0,), warm_start=0
            ),
        ),
        PolicySpec(
            "cascade",
            f"hierarchical cascade {'>'.join(dimensions)}, min samples {list(cascade_min)}, "
            "warm start 10, exploration default, tree rebuilt and pruned as the server does",
            Context.SEGMENTS,
            _experiment("cascade", variants, dimensions=dimensions, min_samples=cascade_min),
            tree=True,
        ),
        PolicySpec(
            "cascade_floor",
            f"the cascade with a propensity floor of {CASCADE_FLOOR} per variant, so that its "
            "logs support off-policy evaluation",
            Context.SEGMENTS,
            _experiment(
                "cascade_floor",
                variants,
                dimensions=dimensions,
                min_samples=cascade_min,
                propensity_floor=CASCADE_FLOOR,
            ),
            tree=True,
        ),
        PolicySpec(
            "cascade_unpruned",
            "the cascade without tree rebuilds: every node with enough samples is used",
            Context.SEGMENTS,
            _experiment(
                "cascade_unpruned", variants, dimensions=dimensions, min_samples=cascade_min
            ),
        ),
        PolicySpec(
            "cascade_aggressive",
            "the cascade with exploration `aggressive`",
            Context.SEGMENTS,
            _experiment(
                "cascade_aggressive",
                variants,
                dimensions=dimensions,
                min_samples=cascade_min,
                exploration=Exploration.AGGRESSIVE,
            ),
            tree=True,
        ),
        PolicySpec(
            "cascade_conservative",
            "the cascade with exploration `conservative`",
            Context.SEGMENTS,
            _experiment(
                "cascade_conservative",
                variants,
                dimensions=dimensions,
                min_samples=cascade_min,
                exploration=Exploration.CONSERVATIVE,
            ),
            tree=True,
        ),
        PolicySpec(
            "clusters",
            f"auto mode: k-means clusters (k by silhouette in 2..8) of the users' features, "
            f"min samples {CLUSTER_MIN_SAMPLES}, warm start 10",
            Context.CLUSTER,
            _experiment("clusters", variants, min_samples=(CLUSTER_MIN_SAMPLES,), auto=True),
            tree=True,
        ),
    ]
    return {s.name: s for s in specs}


# Clustering for the auto-mode policy ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterModel:
    """k-means centroids; `silhouette` is the mean silhouette of the chosen k on its sample."""

    centroids: FloatArray
    silhouette: float

    def assign(self, features: FloatArray) -> IntArray:
        """Nearest centroid of each row."""
        return _nearest(features, self.centroids)


def _nearest(x: FloatArray, centroids: FloatArray) -> IntArray:
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return np.asarray(d.argmin(axis=1), dtype=np.int64)


def kmeans(x: FloatArray, k: int, rng: np.random.Generator, iterations: int = 50) -> FloatArray:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007); the centroids."""
    centroids = np.empty((k, x.shape[1]))
    centroids[0] = x[rng.integers(len(x))]
    closest = ((x - centroids[0]) ** 2).sum(1)
    for j in range(1, k):
        centroids[j] = x[rng.choice(len(x), p=closest / closest.sum())]
        closest = np.minimum(closest, ((x - centroids[j]) ** 2).sum(1))
    for _ in range(iterations):
        labels = _nearest(x, centroids)
        moved = np.array(
            [x[labels == j].mean(0) if np.any(labels == j) else centroids[j] for j in range(k)]
        )
        if np.allclose(moved, centroids):
            break
        centroids = moved
    return centroids


def _distances(x: FloatArray) -> FloatArray:
    squared = (x * x).sum(1)
    d2 = squared[:, None] - 2.0 * x @ x.T + squared[None, :]
    return np.asarray(np.sqrt(np.maximum(d2, 0.0)), dtype=np.float64)


def silhouette(x: FloatArray, labels: IntArray, distances: FloatArray | None = None) -> float:
    """Mean silhouette coefficient (Rousseeuw 1987), as `sklearn.metrics.silhouette_score`."""
    d = _distances(x) if distances is None else distances
    ks = np.unique(labels)
    if len(ks) < 2:
        return -1.0
    sums = np.stack([d[:, labels == k].sum(1) for k in ks], axis=1)
    sizes = np.array([(labels == k).sum() for k in ks], dtype=np.float64)
    own = np.searchsorted(ks, labels)
    rows = np.arange(len(x))
    own_size = sizes[own] - 1.0
    a = np.where(own_size > 0, sums[rows, own] / np.maximum(own_size, 1.0), 0.0)
    means = sums / sizes[None, :]
    means[rows, own] = np.inf
    b = means.min(1)
    s = np.where(own_size > 0, (b - a) / np.maximum(a, b), 0.0)
    return float(s.mean())


def fit_clusters(features: FloatArray, seed: int, ks: range = range(2, 9)) -> ClusterModel:
    """k-means for each k in `ks` on these features; the k with the best silhouette wins."""
    rng = np.random.default_rng([seed, 11])
    # The silhouette is scored on a sample: it is quadratic in the number of points.
    sample = features[rng.permutation(len(features))[:SILHOUETTE_SAMPLE]]
    distances = _distances(sample)
    best: ClusterModel | None = None
    for k in ks:
        centroids = kmeans(features, k, rng)
        score = silhouette(sample, _nearest(sample, centroids), distances)
        if best is None or score > best.silhouette:
            best = ClusterModel(centroids, score)
    assert best is not None
    return best
