"""Synthetic populations with known conversion rates, and the user streams drawn from them.

A scenario fixes the truth: which segments exist (leaves of the segment tree, one value per
dimension), how much traffic each gets, and the conversion rate of every variant for every user
type. A user's type is its leaf, except in the cluster scenario where types are latent clusters
seen only through a numeric feature vector. The truth is built from a fixed construction seed, so
it is the same for every run seed; the run seed draws the user stream.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DIMENSIONS = ("country", "device", "source")
_COUNTRIES = ("us", "de", "in")
_DEVICES = ("mobile", "desktop")
_SOURCES = ("google", "instagram", "email")
# Seed of the construction of every scenario's truth (not of the runs).
_TRUTH_SEED = 20_240_901
VARIANTS = 3


@dataclass(frozen=True, eq=False)
class Scenario:
    """The truth of one synthetic population.

    `rates[z, k]` is the conversion probability of variant k for a user of type z; with
    `drift_to`, rates move linearly from `rates` (at `drift_start` of the run) to `drift_to`
    (at its end). With `latent_types`, types are drawn by `type_weights` independently of the
    leaf; otherwise a user's type is its leaf. `new_leaves` get no traffic before `appear_at`
    (a fraction of the run) and `traffic_after` from then on.
    """

    name: str
    description: str
    dimensions: tuple[str, ...]
    leaves: tuple[tuple[str, ...], ...]
    traffic: FloatArray
    rates: FloatArray
    centers: FloatArray
    feature_noise: float = 0.15
    latent_types: bool = False
    type_weights: FloatArray | None = None
    new_leaves: tuple[int, ...] = ()
    appear_at: float = 0.5
    traffic_after: FloatArray | None = None
    drift_to: FloatArray | None = None
    drift_start: float = 0.0

    @property
    def variants(self) -> int:
        return int(self.rates.shape[1])

    def leaf_key(self, leaf: int) -> str:
        """A leaf's values joined into one label (the flat per-segment policy's only value)."""
        return "-".join(self.leaves[leaf])


@dataclass(frozen=True, eq=False)
class Users:
    """One stream of users: per user its leaf, type, feature vector and reward draw.

    A user converts on variant k when `draw < rate[k]`: every policy sees the same users and the
    same draws (common random numbers), so paired differences between policies are exact.
    """

    seed: int
    leaf: IntArray
    type: IntArray
    features: FloatArray
    draw: FloatArray
    rates: FloatArray  # (n, variants): each user's true rate of every variant

    def __len__(self) -> int:
        return len(self.leaf)

    @property
    def best_rate(self) -> FloatArray:
        return np.asarray(self.rates.max(axis=1), dtype=np.float64)


def draw_users(scenario: Scenario, n: int, seed: int) -> Users:
    """The stream of `n` users of one run, fully determined by the scenario and `seed`."""
    rng = np.random.default_rng([seed, 7])
    leaf = rng.choice(len(scenario.leaves), size=n, p=scenario.traffic)
    if scenario.new_leaves and scenario.traffic_after is not None:
        start = int(scenario.appear_at * n)
        leaf[start:] = rng.choice(len(scenario.leaves), size=n - start, p=scenario.traffic_after)
    if scenario.latent_types and scenario.type_weights is not None:
        kinds = rng.choice(len(scenario.type_weights), size=n, p=scenario.type_weights)
    else:
        kinds = leaf.copy()
    features = scenario.centers[kinds] + scenario.feature_noise * rng.standard_normal(
        (n, scenario.centers.shape[1])
    )
    draw = rng.random(n)
    rates = scenario.rates[kinds]
    if scenario.drift_to is not None:
        progress = np.clip(
            (np.arange(n) / n - scenario.drift_start) / (1.0 - scenario.drift_start), 0.0, 1.0
        )[:, None]
        rates = (1.0 - progress) * rates + progress * scenario.drift_to[kinds]
    return Users(
        seed=seed,
        leaf=leaf.astype(np.int64),
        type=kinds.astype(np.int64),
        features=features,
        draw=draw,
        rates=np.asarray(rates, dtype=np.float64),
    )


def _one_hot_centers(leaves: Sequence[tuple[str, ...]]) -> FloatArray:
    """Feature centres of leaf-typed users: one-hot of each dimension's value."""
    columns: list[tuple[int, str]] = sorted({(d, v) for leaf in leaves for d, v in enumerate(leaf)})
    index = {c: i for i, c in enumerate(columns)}
    centers = np.zeros((len(leaves), len(columns)))
    for row, leaf in enumerate(leaves):
        for d, v in enumerate(leaf):
            centers[row, index[(d, v)]] = 1.0
    return centers


def _grid(
    countries: Sequence[str], devices: Sequence[str], sources: Sequence[str]
) -> tuple[tuple[str, ...], ...]:
    return tuple(itertools.product(countries, devices, sources))


def _segmented_rates(
    leaves: Sequence[tuple[str, ...]],
    rng: np.random.Generator,
    best_of: Callable[[tuple[str, ...]], int],
    win: float = 1.35,
    lose: float = 0.85,
) -> FloatArray:
    """Rates where variant `best_of(leaf)` converts `win`x a leaf's base, the others `lose`x."""
    rates = np.empty((len(leaves), VARIANTS))
    for i, leaf in enumerate(leaves):
        base = rng.uniform(0.03, 0.07)
        rates[i] = base * lose * rng.uniform(0.95, 1.05, VARIANTS)
        rates[i, best_of(leaf)] = base * win
    return rates


def _by_country_device(leaf: tuple[str, ...]) -> int:
    # Six (country, device) groups; each variant is best in two of them.
    return (_COUNTRIES.index(leaf[0]) + 2 * _DEVICES.index(leaf[1])) % VARIANTS


def heterogeneous() -> Scenario:
    """18 segments; the best variant depends on (country, device)."""
    rng = np.random.default_rng(_TRUTH_SEED)
    leaves = _grid(_COUNTRIES, _DEVICES, _SOURCES)
    return Scenario(
        name="heterogeneous",
        description="18 segments (3 countries x 2 devices x 3 sources); the best of 3 variants "
        "depends on country and device (+35% over the segment's base, the others -15%)",
        dimensions=DIMENSIONS,
        leaves=leaves,
        traffic=rng.dirichlet(np.full(len(leaves), 5.0)),
        rates=_segmented_rates(leaves, rng, _by_country_device),
        centers=_one_hot_centers(leaves),
    )


def homogeneous() -> Scenario:
    """18 segments with different base rates, but variant 2 is best everywhere."""
    rng = np.random.default_rng(_TRUTH_SEED + 1)
    leaves = _grid(_COUNTRIES, _DEVICES, _SOURCES)
    base = rng.uniform(0.03, 0.07, len(leaves))[:, None]
    return Scenario(
        name="homogeneous",
        description="18 segments with base rates 3-7%; variant 2 is best everywhere "
        "(rates x1.00, x1.10, x1.25): there is nothing to find by segmenting",
        dimensions=DIMENSIONS,
        leaves=leaves,
        traffic=rng.dirichlet(np.full(len(leaves), 5.0)),
        rates=base * np.array([1.0, 1.10, 1.25]),
        centers=_one_hot_centers(leaves),
    )


def long_tail() -> Scenario:
    """600 segments with Zipf traffic; the best variant depends on the country."""
    rng = np.random.default_rng(_TRUTH_SEED + 2)
    countries = tuple(f"c{i:02d}" for i in range(25))
    sources = tuple(f"s{i}" for i in range(8))
    leaves = _grid(countries, ("mobile", "desktop", "tablet"), sources)
    weights = 1.0 / np.arange(1, len(leaves) + 1) ** 1.1
    traffic = rng.permutation(weights / weights.sum())
    return Scenario(
        name="long_tail",
        description="600 segments (25 countries x 3 devices x 8 sources), Zipf(1.1) traffic: "
        "most segments see a few dozen users; the best variant depends on the country",
        dimensions=DIMENSIONS,
        leaves=leaves,
        traffic=traffic,
        rates=_segmented_rates(leaves, rng, lambda leaf: countries.index(leaf[0]) % VARIANTS),
        centers=_one_hot_centers(leaves),
    )


def new_segment() -> Scenario:
    """The heterogeneous population, and a new country appearing half way through the run."""
    rng = np.random.default_rng(_TRUTH_SEED + 3)
    old = _grid(_COUNTRIES, _DEVICES, _SOURCES)
    new = _grid(("br",), _DEVICES, _SOURCES)
    leaves = old + new
    countries = (*_COUNTRIES, "br")
    rates = _segmented_rates(
        leaves,
        rng,
        lambda leaf: (countries.index(leaf[0]) + 2 * _DEVICES.index(leaf[1])) % VARIANTS,
    )
    before = np.concatenate([rng.dirichlet(np.full(len(old), 5.0)), np.zeros(len(new))])
    after = np.concatenate([0.9 * before[: len(old)], np.full(len(new), 0.1 / len(new))])
    return Scenario(
        name="new_segment",
        description="the heterogeneous population; country `br` (6 segments, 10% of traffic) "
        "appears half way through the run",
        dimensions=DIMENSIONS,
        leaves=leaves,
        traffic=before,
        rates=rates,
        centers=_one_hot_centers(leaves),
        new_leaves=tuple(range(len(old), len(leaves))),
        appear_at=0.5,
        traffic_after=after,
    )


def drifting() -> Scenario:
    """Heterogeneous rates that drift, from a third of the run on, to a rotated preference."""
    rng = np.random.default_rng(_TRUTH_SEED + 4)
    leaves = _grid(_COUNTRIES, _DEVICES, _SOURCES)
    start = _segmented_rates(leaves, rng, _by_country_device)
    end = np.roll(start, 1, axis=1)  # every segment's best variant moves to the next one
    return Scenario(
        name="drifting",
        description="the heterogeneous structure; from 1/3 of the run on, every segment's rates "
        "drift linearly until its best variant is the next one",
        dimensions=DIMENSIONS,
        leaves=leaves,
        traffic=rng.dirichlet(np.full(len(leaves), 5.0)),
        rates=start,
        centers=_one_hot_centers(leaves),
        drift_to=end,
        drift_start=1.0 / 3.0,
    )


def clusters() -> Scenario:
    """Four latent user clusters in a 6-d feature space; segments carry no signal."""
    rng = np.random.default_rng(_TRUTH_SEED + 5)
    leaves = _grid(_COUNTRIES, _DEVICES, _SOURCES)
    k = 4
    rates = np.empty((k, VARIANTS))
    for z in range(k):
        base = rng.uniform(0.04, 0.06)
        rates[z] = base * 0.85
        rates[z, z % VARIANTS] = base * 1.4
    return Scenario(
        name="clusters",
        description="4 latent clusters (6 numeric features, well separated); the best variant "
        "depends on the cluster only, segments are drawn independently of it",
        dimensions=DIMENSIONS,
        leaves=leaves,
        traffic=rng.dirichlet(np.full(len(leaves), 5.0)),
        rates=rates,
        centers=rng.uniform(0.0, 1.0, (k, 6)),
        feature_noise=0.08,
        latent_types=True,
        type_weights=np.array([0.4, 0.3, 0.2, 0.1]),
    )


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "heterogeneous": heterogeneous,
    "homogeneous": homogeneous,
    "long_tail": long_tail,
    "new_segment": new_segment,
    "drifting": drifting,
    "clusters": clusters,
}


def scenario(name: str) -> Scenario:
    """The scenario called `name` (one of SCENARIOS)."""
    try:
        return SCENARIOS[name]()
    except KeyError:
        raise ValueError(f"unknown scenario {name!r} (one of {', '.join(SCENARIOS)})") from None
