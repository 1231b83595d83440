"""The off-policy bar's statistics: t quantiles and binomial tails against scipy, and the bar
check on synthetic results whose truth is known (unbiased, biased, over-confident)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from allocsvc.quality import ope
from allocsvc.quality.ope_check import (
    OpeResult,
    bar_check,
    bias_interval,
    binomial_cdf,
    t_quantile,
)

pytestmark = pytest.mark.unit

TRUE = 0.05


@pytest.mark.parametrize(("q", "df"), [(0.975, 1), (0.975, 7), (0.975, 19), (1 - 0.05 / 6, 19)])
def test_t_quantile_matches_scipy(q: float, df: int) -> None:
    assert t_quantile(q, df) == pytest.approx(float(stats.t.ppf(q, df)), rel=1e-9)


@pytest.mark.parametrize(("k", "n"), [(60, 60), (57, 60), (52, 60), (13, 24)])
def test_binomial_cdf_matches_scipy(k: int, n: int) -> None:
    assert binomial_cdf(k, n, 0.95) == pytest.approx(float(stats.binom.cdf(k, n, 0.95)), rel=1e-9)


def results(
    rng: np.random.Generator, shift: float, claimed_se: float, seeds: int = 40
) -> list[OpeResult]:
    """Estimates true + shift + N(0, 0.001^2) with intervals of +-1.96 claimed_se, for 2 targets."""
    out = []
    for seed in range(seeds):
        for target in ("a", "b"):
            value = TRUE + shift + rng.normal(0.0, 0.001)
            half = ope.Z95 * claimed_se
            est = ope.Estimate("ips", value, value - half, value + half)
            out.append(
                OpeResult(
                    scenario="s",
                    logging="l",
                    target=target,
                    seed=seed,
                    users=1000,
                    true_value=TRUE,
                    on_policy=ope.Estimate("on_policy", TRUE, TRUE - 0.002, TRUE + 0.002),
                    estimates=(est,),
                    effective_sample_size=1000.0,
                    min_propensity=0.3,
                )
            )
    return out


def test_an_unbiased_estimator_with_honest_intervals_meets_the_bar() -> None:
    rows = results(np.random.default_rng(1), shift=0.0, claimed_se=0.001)
    check = bar_check(rows, "ips")
    assert check.met, check
    assert check.covered >= 0.85 * check.cases
    interval = bias_interval([r for r in rows if r.target == "a"], "ips")
    assert interval.covers(0.0)


def test_a_biased_estimator_fails_on_its_mean_error() -> None:
    check = bar_check(results(np.random.default_rng(2), shift=0.001, claimed_se=0.001), "ips")
    assert check.biased == ("a", "b")
    assert not check.met


def test_over_confident_intervals_fail_on_coverage() -> None:
    check = bar_check(results(np.random.default_rng(3), shift=0.0, claimed_se=0.0003), "ips")
    assert not check.biased
    assert check.coverage_p < 0.05
    assert not check.met
