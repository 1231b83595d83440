"""The Rust decision engine from Python: cascade, trees, policies, learning, bad arguments."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from allocsvc.core import (
    Engine,
    beta_throughput,
    bucket,
    key_hash,
    path_keys,
    sample_beta,
    seed_rng,
    selection_probabilities,
    thompson_select,
)

pytestmark = pytest.mark.unit

EXPERIMENT = 5
DIMENSIONS = ["country", "device", "source"]
MIN_SAMPLES = [1000, 500, 200]
VALUES = ["us", "mobile", "instagram"]
PATH_HASHES = [key_hash(k) for k in path_keys(DIMENSIONS, VALUES)]


def cascade_engine(samples: Sequence[int | None], variants: int = 3) -> Engine:
    """An engine whose path nodes for VALUES hold `samples[l]` allocations (None: no node)."""
    engine = Engine()
    engine.configure(EXPERIMENT, variants=variants, dimensions=DIMENSIONS, min_samples=MIN_SAMPLES)
    rows = []
    for h, n in zip(PATH_HASHES, samples, strict=True):
        if n is None:
            continue
        for v in range(variants):
            share = n // variants + (n % variants if v == 0 else 0)
            rows.append((EXPERIMENT, h, v, share, share // 10, 0.0))
    engine.load_counts(rows)
    return engine


def level(engine: Engine, values: Sequence[str] = VALUES) -> int:
    return engine.decide(EXPERIMENT, "user", values, record=False)[1]


# (allocations at global, country, country|device, country|device|source; expected level)
CASCADE_CASES = [
    ([10, 5, 3, 1], 0),
    ([5000, 1000, 400, 100], 1),
    ([5000, 1000, 600, 250], 3),
    ([5000, 999, 499, 199], 0),
    ([5000, 900, 600, 100], 2),  # level 1 is short, level 2 qualifies on its own
    ([5000, 1200, 100, 50], 1),
    ([5000, 1000, 500, 200], 3),  # minimums are inclusive
    ([5000, 1000, 500, 199], 2),
    ([5000, 100, 10, 300], 3),  # only the deepest level qualifies
    ([None, None, None, None], 0),
    ([5000, 2000, None, 300], 3),
    ([5000, 2000, 800, None], 2),
    ([0, 0, 0, 0], 0),
]


@pytest.mark.parametrize(("samples", "expected"), CASCADE_CASES)
def test_cascade_uses_the_deepest_qualifying_level(
    samples: list[int | None], expected: int
) -> None:
    engine = cascade_engine(samples)
    seed_rng(1)
    assert level(engine) == expected
    # the same segment written differently is the same path
    assert level(engine, [" US", "MOBILE ", "Instagram"]) == expected


def test_other_segments_share_only_their_common_prefix() -> None:
    engine = cascade_engine([5000, 2000, 800, 300])
    assert level(engine) == 3
    assert level(engine, ["us", "mobile", "google"]) == 2
    assert level(engine, ["us", "desktop", "instagram"]) == 1
    assert level(engine, ["de", "mobile", "instagram"]) == 0


def test_decide_without_recording_does_not_move_the_cascade() -> None:
    engine = cascade_engine([5000, 1000, 500, 199])
    for _ in range(50):
        assert level(engine) == 2
    engine.decide(EXPERIMENT, "user", VALUES, record=True)
    assert level(engine) == 3


def test_set_tree_removes_nodes_from_the_cascade_and_none_restores() -> None:
    engine = cascade_engine([5000, 2000, 800, 300])
    assert level(engine) == 3
    engine.set_tree(EXPERIMENT, PATH_HASHES[1:3])
    assert level(engine) == 2
    engine.set_tree(EXPERIMENT, [PATH_HASHES[1], PATH_HASHES[3]])
    assert level(engine) == 3
    engine.set_tree(EXPERIMENT, [PATH_HASHES[1]])
    assert level(engine) == 1
    engine.set_tree(EXPERIMENT, [])
    assert level(engine) == 0, "the global node is always in the tree"
    engine.configure(EXPERIMENT, variants=3, dimensions=DIMENSIONS, min_samples=MIN_SAMPLES)
    assert level(engine) == 0, "reconfiguring keeps the tree"
    engine.set_tree(EXPERIMENT, None)
    assert level(engine) == 3


def test_levels_without_a_minimum_need_no_data() -> None:
    engine = Engine()
    engine.configure(1, variants=2, dimensions=["device"], min_samples=[0])
    assert engine.decide(1, "u", ["mobile"], record=False)[1] == 1


def test_decision_tuple() -> None:
    engine = cascade_engine([5000, 2000, 800, 300])
    seed_rng(2)
    variant, lvl, propensity, key = engine.decide(EXPERIMENT, "u", [" US", "Mobile", "Insta"])
    assert 0 <= variant < 3
    assert lvl == 2
    assert 0.0 < propensity <= 1.0
    assert key == "country:us|device:mobile|source:insta"
    batch = engine.decide_batch(EXPERIMENT, ["a", "b"], [VALUES, ["de", "x", "y"]], record=False)
    assert [(d[1], d[3]) for d in batch] == [
        (3, "country:us|device:mobile|source:instagram"),
        (0, "country:de|device:x|source:y"),
    ]
    assert engine.decide_batch(EXPERIMENT, [], []) == []


def run_two_segment_experiment() -> tuple[Engine, list[tuple[int, int, float, str]]]:
    """20,000 decisions where variant 1 converts best in instagram/mobile, variant 0 in
    google/desktop (the Rust test `learns_per_segment_best_variant`, driven from Python)."""
    seed_rng(11)
    engine = Engine()
    engine.configure(1, variants=2, dimensions=["source", "device"], min_samples=[100, 50], salt=7)
    rng = np.random.default_rng(5)
    segments = [["instagram", "mobile"], ["google", "desktop"]]
    rates = [[0.04, 0.12], [0.10, 0.03]]
    decisions = []
    for t in range(20_000):
        s = t % 2
        decision = engine.decide(1, f"user-{t}", segments[s])
        variant, _level, _propensity, key = decision
        if rng.random() < rates[s][variant]:
            engine.record_conversion(1, key, variant, 1.0)
        decisions.append(decision)
    return engine, decisions


def test_learns_the_best_variant_of_each_segment() -> None:
    engine, decisions = run_two_segment_experiment()
    mobile = Counter(d[0] for d in decisions[18_000::2])
    desktop = Counter(d[0] for d in decisions[18_001::2])
    assert mobile[1] > 800, mobile
    assert desktop[0] > 800, desktop
    assert Counter(d[1] for d in decisions[18_000:]) == {2: 2000}
    assert engine.counts(1, "")[0][0] + engine.counts(1, "")[1][0] == 20_000
    assert all(0.0 <= d[2] <= 1.0 for d in decisions)


def test_thompson_propensity_is_never_zero() -> None:
    _engine, decisions = run_two_segment_experiment()
    assert min(d[2] for d in decisions) > 0.0


def uniform_engine(weights: list[float] | None, salt: int = 3, policy: str = "uniform") -> Engine:
    engine = Engine()
    engine.configure(
        2,
        variants=3,
        dimensions=["device"],
        min_samples=[10],
        policy=policy,
        weights=weights,
        salt=salt,
    )
    return engine


@pytest.mark.parametrize(
    ("weights", "shares"),
    [([2.0, 3.0, 5.0], [0.2, 0.3, 0.5]), (None, [1 / 3] * 3), ([0.0, 1.0, 1.0], [0, 0.5, 0.5])],
)
def test_uniform_split_is_a_deterministic_weighted_hash(
    weights: list[float] | None, shares: list[float]
) -> None:
    engine = uniform_engine(weights)
    users = [f"user-{i}" for i in range(100_000)]
    rows = [["mobile"]] * len(users)
    first = engine.decide_batch(2, users, rows, record=False)
    again = engine.decide_batch(2, users, rows, record=False)
    assert [d[0] for d in first] == [d[0] for d in again]
    cumulative = np.cumsum(shares)
    picks = np.bincount([d[0] for d in first], minlength=3) / len(users)
    assert picks == pytest.approx(shares, abs=0.01)
    for user, (variant, lvl, propensity, _key) in zip(users[:5000], first, strict=False):
        assert variant == int(np.searchsorted(cumulative, bucket(user, 3), side="right"))
        assert lvl == 0
        assert propensity == pytest.approx(shares[variant], abs=1e-12)
        assert 0.0 < propensity <= 1.0
    assert engine.propensities(2, "device:mobile") == pytest.approx(shares, abs=1e-12)


def test_uniform_split_depends_on_the_salt() -> None:
    users = [f"user-{i}" for i in range(1000)]
    rows = [["mobile"]] * len(users)
    a = [d[0] for d in uniform_engine(None, salt=1).decide_batch(2, users, rows, record=False)]
    b = [d[0] for d in uniform_engine(None, salt=2).decide_batch(2, users, rows, record=False)]
    assert a != b


def test_fixed_split_follows_the_weights_at_random() -> None:
    seed_rng(4)
    engine = uniform_engine([1.0, 1.0, 2.0], policy="fixed")
    users = ["same-user"] * 100_000
    decisions = engine.decide_batch(2, users, [["x"]] * len(users), record=False)
    picks = np.bincount([d[0] for d in decisions], minlength=3) / len(users)
    assert picks == pytest.approx([0.25, 0.25, 0.5], abs=0.01)
    assert {(d[0], d[2]) for d in decisions} == {(0, 0.25), (1, 0.25), (2, 0.5)}


def test_thompson_propensity_of_a_dominant_arm() -> None:
    seed_rng(8)
    engine = Engine()
    engine.configure(3, variants=3, dimensions=[], min_samples=[])
    g = key_hash("")
    engine.load_counts(
        [(3, g, 0, 1000, 10, 0.0), (3, g, 1, 1000, 300, 0.0), (3, g, 2, 1000, 50, 0.0)]
    )
    for _ in range(100):
        variant, lvl, propensity, key = engine.decide(3, "u", [], record=False)
        assert (variant, lvl, key) == (1, 0, "")
        assert 0.95 < propensity <= 1.0
    p = engine.propensities(3, "")
    assert p[1] > 0.95
    assert sum(p) == pytest.approx(1.0)


def test_thompson_propensity_matches_the_selection_probability() -> None:
    seed_rng(9)
    engine = Engine()
    engine.configure(3, variants=2, dimensions=[], min_samples=[])
    g = key_hash("")
    engine.load_counts([(3, g, 0, 400, 40, 0.0), (3, g, 1, 400, 48, 0.0)])
    exact = selection_probabilities([41.0, 49.0], [361.0, 353.0])
    for _ in range(200):
        variant, _lvl, propensity, _key = engine.decide(3, "u", [], record=False)
        # 512 Monte Carlo rounds behind each estimate: standard error below 0.023
        assert propensity == pytest.approx(exact[variant], abs=0.07)


def test_exploration_bonus_favours_the_undersampled_arm() -> None:
    seed_rng(10)
    engine = Engine()
    engine.configure(3, variants=2, dimensions=[], min_samples=[], exploration=1.0)
    g = key_hash("")
    engine.load_counts([(3, g, 0, 10_000, 5_000, 0.0), (3, g, 1, 0, 0, 0.0)])
    assert all(engine.decide(3, "u", [], record=False)[0] == 1 for _ in range(200))


@pytest.mark.parametrize(("warm_start", "low", "high"), [(1000.0, 0.99, 1.0), (0.0, 0.35, 0.65)])
def test_warm_start_carries_the_parent_mean_to_a_new_node(
    warm_start: float, low: float, high: float
) -> None:
    engine = Engine()
    engine.configure(3, variants=2, dimensions=["device"], min_samples=[0], warm_start=warm_start)
    g = key_hash("")
    engine.load_counts([(3, g, 0, 10_000, 100, 0.0), (3, g, 1, 10_000, 3_000, 0.0)])
    seed_rng(12)
    p = engine.propensities(3, "device:mobile")
    assert low <= p[1] <= high, p


def test_propensity_follows_a_reconfigure() -> None:
    seed_rng(13)
    engine = Engine()
    engine.configure(3, variants=2, dimensions=[], min_samples=[])
    g = key_hash("")
    engine.load_counts([(3, g, 0, 1000, 500, 0.0), (3, g, 1, 10, 5, 0.0)])
    engine.decide(3, "u", [], record=False)
    engine.configure(3, variants=2, dimensions=[], min_samples=[], exploration=1.0)
    variant, _lvl, propensity, _key = engine.decide(3, "u", [], record=False)
    assert variant == 1
    assert propensity > 0.9


def test_unknown_experiment_raises_key_error() -> None:
    engine = Engine()
    calls: list[Callable[[], object]] = [
        lambda: engine.decide(42, "u", []),
        lambda: engine.decide_batch(42, ["u"], [[]]),
        lambda: engine.record_allocation(42, "", 0),
        lambda: engine.record_conversion(42, "", 0, 1.0),
        lambda: engine.set_tree(42, None),
        lambda: engine.propensities(42, ""),
    ]
    for call in calls:
        with pytest.raises(KeyError, match="experiment"):
            call()
    engine.remove(42)  # removing an unknown experiment is a no-op
    assert not engine.has_experiment(42)


def configure_with(**overrides: object) -> None:
    settings: dict[str, object] = {
        "variants": 2,
        "dimensions": ["device"],
        "min_samples": [10],
    }
    settings.update(overrides)
    Engine().configure(1, **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"variants": 0}, "variants"),
        ({"variants": 1025}, "variants"),
        ({"dimensions": ["Device"]}, "dimensions"),
        ({"dimensions": ["a|b"], "min_samples": [1]}, "dimensions"),
        ({"dimensions": [f"d{i}" for i in range(9)], "min_samples": [1] * 9}, "dimensions"),
        ({"min_samples": [10, 20]}, "min_samples"),
        ({"policy": "epsilon"}, "policy"),
        ({"weights": [0.0, 0.0]}, "weights"),
        ({"weights": [1.0, -1.0]}, "weights"),
        ({"weights": [1.0, math.nan]}, "weights"),
        ({"weights": [1.0]}, "weights"),
        ({"prior_alpha": 0.0}, "prior_alpha"),
        ({"prior_beta": -1.0}, "prior_beta"),
        ({"warm_start": -1.0}, "warm_start"),
        ({"exploration": math.inf}, "exploration"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_argument(
    overrides: dict[str, object], argument: str
) -> None:
    with pytest.raises(ValueError, match=f"^{argument}"):
        configure_with(**overrides)


def test_bad_call_arguments_raise_value_error_naming_the_argument() -> None:
    engine = Engine()
    engine.configure(1, variants=2, dimensions=["device", "source"], min_samples=[10, 5])
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: engine.decide(1, "u", ["mobile"]), "^values"),
        (lambda: engine.decide(1, "u", ["a", "b", "c"]), "^values"),
        (lambda: engine.decide_batch(1, ["u", "v"], [["a", "b"]]), "^values"),
        (
            lambda: engine.decide_batch(1, ["u", "v"], [["a", "b"], ["a"]], record=False),
            r"^values\[1\]",
        ),
        (lambda: engine.record_conversion(1, "", 0, math.nan), "^value"),
        (lambda: engine.record_conversion(1, "", 0, -1.0), "^value"),
        (lambda: engine.record_conversion(1, "", 2, 1.0), "^variant"),
        (lambda: engine.record_allocation(1, "", 2), "^variant"),
        (lambda: sample_beta(0.0, 1.0, 10), "alpha"),
        (lambda: beta_throughput(-1.0, 1.0, 10), "alpha"),
        (lambda: thompson_select([1.0, 1.0], [1.0]), "^alphas, betas"),
        (lambda: selection_probabilities([1.0], [1.0, 2.0]), "^alphas, betas"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    # nothing was counted by the failed calls
    assert engine.take_deltas() == []


def test_a_failed_batch_counts_nothing() -> None:
    engine = Engine()
    engine.configure(1, variants=2, dimensions=["device"], min_samples=[10])
    with pytest.raises(ValueError, match=r"^values\[1\]: expected"):
        engine.decide_batch(1, ["u", "v"], [["mobile"], []])
    assert engine.take_deltas() == []
