"""The per-experiment propensity floor: validation, proto and store translation, and the engine's
mixture (1 - K f) p_i + f checked against the Thompson probabilities integrated by scipy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import integrate, stats

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.experiments import Experiment, Exploration, Variant, validate
from allocsvc.api.convert import changes_from_update, experiment_from_pb, experiment_to_pb
from allocsvc.core import Engine, key_hash, seed_rng
from allocsvc.errors import InvalidRequest
from allocsvc.quality.policies import CASCADE_FLOOR, standard_policies
from allocsvc.quality.scenarios import draw_users, scenario
from allocsvc.quality.simulator import run_policy
from allocsvc.store.writebehind import experiment_from_row, experiment_row

pytestmark = pytest.mark.unit

FIELD = "experiment.exploration.propensity_floor"
# (allocations, conversions) per variant at the global node: variant 1 is far ahead.
COUNTS = [(2000, 80), (2000, 160), (2000, 100)]


def _experiment(floor: float, variants: int = 3) -> Experiment:
    return Experiment(
        key="floored",
        name="floored",
        variants=tuple(Variant(f"v{i}", f"v{i}") for i in range(variants)),
        exploration=Exploration.CONSERVATIVE,
        propensity_floor=floor,
    )


@pytest.mark.parametrize("floor", [0.0, 0.01, 0.3333])
def test_a_floor_below_one_over_the_variants_is_valid(floor: float) -> None:
    validate(_experiment(floor), max_variants=10)


@pytest.mark.parametrize(
    ("floor", "variants"),
    [(-0.01, 3), (1 / 3, 3), (0.5, 2), (0.2, 5), (math.nan, 3), (math.inf, 2)],
)
def test_a_bad_floor_is_refused_naming_the_field(floor: float, variants: int) -> None:
    with pytest.raises(InvalidRequest) as raised:
        validate(_experiment(floor, variants), max_variants=10)
    assert raised.value.field == FIELD


def test_the_floor_travels_through_proto_update_mask_and_store_row() -> None:
    message = experiment_to_pb(_experiment(0.02))
    assert message.exploration.propensity_floor == pytest.approx(0.02)
    assert experiment_from_pb(message).propensity_floor == pytest.approx(0.02)
    assert experiment_from_pb(pb.Experiment(id="x")).propensity_floor == 0.0

    request = pb.UpdateExperimentRequest(experiment=message)
    request.update_mask.paths.append("exploration")
    changes = changes_from_update(request)
    assert changes == {"exploration": Exploration.CONSERVATIVE, "propensity_floor": 0.02}
    request.update_mask.paths[:] = ["name"]
    assert "propensity_floor" not in changes_from_update(request)

    row = experiment_row(_experiment(0.02))
    assert row.propensity_floor == 0.02
    assert experiment_from_row(row).propensity_floor == 0.02


def _thompson_probabilities(counts: list[tuple[int, int]]) -> list[float]:
    """P(variant i's Beta(1 + c, 1 + n - c) draw is the largest), by scipy quadrature."""
    dists = [stats.beta(1 + c, 1 + n - c) for n, c in counts]
    out = []
    for i, d in enumerate(dists):
        others = [o for j, o in enumerate(dists) if j != i]

        def integrand(y: float, d: Any = d, others: list[Any] = others) -> float:
            return float(d.pdf(y) * np.prod([o.cdf(y) for o in others]))

        lo, hi = d.ppf(1e-15), d.ppf(1 - 1e-15)
        value, _ = integrate.quad(integrand, lo, hi, epsabs=1e-14, epsrel=1e-10, limit=200)
        out.append(value)
    return out


def _engine(floors: dict[int, float]) -> Engine:
    engine = Engine()
    g = key_hash("")
    for experiment, floor in floors.items():
        engine.configure(
            experiment, variants=3, dimensions=[], min_samples=[], propensity_floor=floor
        )
        engine.load_counts([(experiment, g, v, n, c, 0.0) for v, (n, c) in enumerate(COUNTS)])
    return engine


def test_the_engine_mixes_the_thompson_probabilities_with_uniform() -> None:
    f = 0.02
    engine = _engine({1: 0.0, 2: f})
    exact = _thompson_probabilities(COUNTS)
    plain = engine.propensities(1, "")
    floored = engine.propensities(2, "")
    # The losing variants are all but never chosen without a floor (rel. error of the core's
    # quadrature < 1e-5).
    assert plain == pytest.approx(exact, rel=1e-5, abs=1e-12)
    assert min(plain) < 1e-4
    assert floored == pytest.approx([(1 - 3 * f) * p + f for p in exact], rel=1e-5)
    assert min(floored) >= f and sum(floored) == pytest.approx(1.0, abs=1e-12)

    # Decisions pick with the floored probabilities and log the one of the variant picked.
    seed_rng(21)
    draws = 30_000
    picked = np.zeros(3, dtype=np.int64)
    for i in range(draws):
        variant, level, propensity, _key = engine.decide(2, f"u{i}", [], record=False)
        assert level == 0 and propensity == floored[variant]
        picked[variant] += 1
    test = stats.chisquare(picked, np.array(floored) * draws)
    assert test.pvalue > 1e-3, (picked, floored)


def test_without_a_floor_the_engine_is_unchanged() -> None:
    engine = _engine({1: 0.0})
    default = Engine()
    default.configure(1, variants=3, dimensions=[], min_samples=[])
    default.load_counts([(1, key_hash(""), v, n, c, 0.0) for v, (n, c) in enumerate(COUNTS)])
    assert engine.propensities(1, "") == default.propensities(1, "")


@pytest.mark.parametrize("floor", [-0.1, 0.5, math.nan])
def test_the_engine_refuses_a_bad_floor(floor: float) -> None:
    with pytest.raises(ValueError, match="propensity_floor"):
        Engine().configure(1, variants=2, dimensions=[], min_samples=[], propensity_floor=floor)


def test_the_simulators_cascade_floor_logs_propensities_at_least_its_floor() -> None:
    truth = scenario("heterogeneous")
    users = draw_users(truth, 20_000, seed=4)
    specs = standard_policies(truth.dimensions, truth.variants)
    assert specs["cascade_floor"].experiment is not None
    assert specs["cascade_floor"].experiment.propensity_floor == CASCADE_FLOOR
    floored = run_policy(specs["cascade_floor"], truth, users)
    plain = run_policy(specs["cascade"], truth, users)
    assert floored.propensity.min() >= CASCADE_FLOOR
    # The same cascade without the floor logs smaller ones on the same stream.
    assert plain.propensity.min() < CASCADE_FLOOR
