"""Statistical primitives of analytics.stats against scipy / statsmodels on grids of inputs."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import special
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_effectsize, proportions_ztest

from allocsvc.analytics import stats

pytestmark = pytest.mark.unit


def test_the_analytics_package_imports_no_numerical_library() -> None:
    code = (
        "import sys, allocsvc.analytics\n"
        "heavy = [m for m in ('numpy', 'scipy', 'statsmodels') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("x", [-38.0, -12.5, -5.0, -1.96, -0.3, 0.0, 0.7, 1.64, 4.0, 9.0, 37.0])
def test_normal_cdf_and_sf_match_scipy(x: float) -> None:
    assert stats.normal_cdf(x) == pytest.approx(sps.norm.cdf(x), rel=1e-13, abs=1e-300)
    assert stats.normal_sf(x) == pytest.approx(sps.norm.sf(x), rel=1e-13, abs=1e-300)


@pytest.mark.parametrize(
    "p",
    [
        1e-300,
        1e-100,
        1e-20,
        1e-9,
        1e-5,
        0.001,
        0.025,
        0.05,
        0.2,
        0.5,
        0.8,
        0.975,
        0.999999,
        1 - 1e-15,
    ],
)
def test_normal_quantiles_match_scipy(p: float) -> None:
    assert stats.normal_ppf(p) == pytest.approx(sps.norm.ppf(p), rel=1e-12, abs=1e-15)
    assert stats.normal_isf(p) == pytest.approx(sps.norm.isf(p), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_normal_quantile_rejects_probabilities_outside_the_open_interval(p: float) -> None:
    with pytest.raises(ValueError):
        stats.normal_ppf(p)


GAMMA_A = [0.5, 1.0, 1.5, 2.5, 7.0, 10.0, 25.0, 120.5, 1e3, 1e4, 2.5e5]


@pytest.mark.parametrize("a", GAMMA_A)
def test_regularized_gamma_matches_scipy(a: float) -> None:
    root = math.sqrt(a)
    xs = [1e-4, 0.1, 0.5, 1.0, 3.0, a / 2, a - root, a, a + 1, a + root, a + 5 * root, 2 * a + 40]
    for x in xs:
        if x <= 0:
            continue
        q_ref = special.gammaincc(a, x)
        p_ref = special.gammainc(a, x)
        assert stats.regularized_gamma_q(a, x) == pytest.approx(q_ref, rel=1e-10, abs=1e-300)
        assert stats.regularized_gamma_p(a, x) == pytest.approx(p_ref, rel=1e-10, abs=1e-300)


def test_regularized_gamma_edges() -> None:
    assert stats.regularized_gamma_q(3.0, 0.0) == 1.0
    assert stats.regularized_gamma_q(3.0, math.inf) == 0.0
    assert stats.regularized_gamma_p(3.0, 0.0) == 0.0
    with pytest.raises(ValueError):
        stats.regularized_gamma_q(0.0, 1.0)
    with pytest.raises(ValueError):
        stats.regularized_gamma_q(1.0, -1.0)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 19, 99])
def test_chi2_sf_matches_scipy_far_into_the_tail(df: int) -> None:
    for statistic in [1e-3, 0.5, float(df), df + 3.0, 10.0 * df + 30.0, 400.0, 1300.0]:
        assert stats.chi2_sf(statistic, df) == pytest.approx(
            sps.chi2.sf(statistic, df), rel=1e-10, abs=1e-300
        )
    assert stats.chi2_sf(0.0, df) == 1.0


BETA_PARAMETERS = [0.5, 1.0, 2.0, 7.5, 40.0, 1001.0]


@pytest.mark.parametrize(("a", "b"), list(itertools.product(BETA_PARAMETERS, BETA_PARAMETERS)))
def test_regularized_beta_matches_scipy(a: float, b: float) -> None:
    mean = a / (a + b)
    for x in [1e-8, 1e-3, 0.02, 0.1, 0.3, 0.5, 0.7, 0.95, 0.9999, mean, min(0.999, 1.2 * mean)]:
        reference = special.betainc(a, b, x)
        assert stats.regularized_beta(x, a, b) == pytest.approx(reference, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize(("a", "b"), [(1e3, 1e5), (3e4, 2e6), (1e5, 1e5), (1.0, 1e6)])
def test_regularized_beta_matches_scipy_for_large_posteriors(a: float, b: float) -> None:
    mean = a / (a + b)
    sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    for k in [-6.0, -2.0, -0.5, 0.0, 0.5, 2.0, 6.0]:
        x = mean + k * sd
        if not 0.0 < x < 1.0:
            continue
        reference = special.betainc(a, b, x)
        assert stats.regularized_beta(x, a, b) == pytest.approx(reference, rel=1e-7, abs=1e-14)


def test_beta_pdf_matches_scipy() -> None:
    for (a, b), x in itertools.product(
        [(1.0, 1.0), (2.0, 30.0), (300.0, 9700.0)], [0.01, 0.03, 0.5]
    ):
        assert stats.beta_pdf(x, a, b) == pytest.approx(sps.beta.pdf(x, a, b), rel=1e-11)


ZTEST_CASES = [
    (30, 1000, 45, 1000),
    (5, 120, 9, 130),
    (480, 10_000, 520, 10_000),
    (1200, 50_000, 1100, 48_000),
    (0, 300, 6, 250),
    (99, 100, 90, 100),
    (10, 20, 2, 400),
]


@pytest.mark.parametrize(("c1", "n1", "c2", "n2"), ZTEST_CASES)
@pytest.mark.parametrize("alternative", list(stats.Alternative))
def test_two_proportion_ztest_matches_statsmodels_pooled(
    c1: int, n1: int, c2: int, n2: int, alternative: stats.Alternative
) -> None:
    z_ref, p_ref = proportions_ztest([c1, c2], [n1, n2], alternative=alternative.value)
    result = stats.two_proportion_ztest(c1, n1, c2, n2, alternative)
    assert result.z == pytest.approx(z_ref, rel=1e-12)
    assert result.p_value == pytest.approx(p_ref, rel=1e-10, abs=1e-300)


def test_two_proportion_ztest_with_nothing_to_separate_is_not_significant() -> None:
    assert stats.two_proportion_ztest(0, 100, 0, 200) == stats.ZTest(z=0.0, p_value=1.0)
    assert stats.two_proportion_ztest(50, 50, 80, 80) == stats.ZTest(z=0.0, p_value=1.0)
    with pytest.raises(ValueError):
        stats.two_proportion_ztest(5, 0, 1, 10)
    with pytest.raises(ValueError):
        stats.two_proportion_ztest(11, 10, 1, 10)


@pytest.mark.parametrize(
    ("p1", "p2"),
    list(itertools.product([0.0, 0.001, 0.03, 0.1, 0.5, 0.77, 1.0], [0.02, 0.25, 0.5])),
)
def test_cohens_h_matches_statsmodels(p1: float, p2: float) -> None:
    assert stats.cohens_h(p1, p2) == pytest.approx(
        proportion_effectsize(p1, p2), rel=1e-13, abs=1e-15
    )


@pytest.mark.parametrize(
    "p_values",
    [
        [0.01, 0.04, 0.03, 0.005],
        [0.5, 0.2, 0.2, 0.001, 0.9, 0.04],
        [1e-8, 0.3],
        [0.02],
        [0.04, 0.04, 0.04],
    ],
)
def test_bonferroni_and_holm_match_statsmodels(p_values: list[float]) -> None:
    for method, adjust in (("bonferroni", stats.bonferroni), ("holm", stats.holm)):
        reference = multipletests(p_values, method=method)[1]
        np.testing.assert_allclose(adjust(p_values), reference, rtol=1e-12)
    assert stats.holm([]) == ()


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        ([10_400, 9_600], [10_000.0, 10_000.0]),
        ([5_010, 4_990], [5_000.0, 5_000.0]),
        ([330, 350, 320], [333.3333333333333, 333.3333333333333, 333.3333333333334]),
        ([120, 80, 810], [101.0, 101.0, 808.0]),
        ([1, 30], [15.5, 15.5]),
        ([60_000, 40_000], [50_000.0, 50_000.0]),
        ([7, 9, 12, 3, 19], [10.0, 10.0, 10.0, 10.0, 10.0]),
    ],
)
def test_chisquare_goodness_of_fit_matches_scipy(
    observed: list[int], expected: list[float]
) -> None:
    reference = sps.chisquare(observed, expected)
    result = stats.chisquare_goodness_of_fit(observed, expected)
    assert result.statistic == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9, abs=1e-300)
    assert result.df == len(observed) - 1


@pytest.mark.parametrize(
    ("successes", "trials"),
    [
        ([30, 45], [1000, 1000]),
        ([30, 45, 60], [1000, 900, 1100]),
        ([5, 4, 6, 5], [100, 100, 100, 100]),
        ([400, 100, 20], [5000, 3000, 1000]),
    ],
)
def test_chisquare_homogeneity_matches_scipy_contingency(
    successes: list[int], trials: list[int]
) -> None:
    table = [[s, n - s] for s, n in zip(successes, trials, strict=True)]
    statistic, p_value, df, _ = sps.chi2_contingency(table, correction=False)
    result = stats.chisquare_homogeneity(successes, trials)
    assert result.statistic == pytest.approx(statistic, rel=1e-12)
    assert result.p_value == pytest.approx(p_value, rel=1e-9)
    assert result.df == df


def test_modified_z_scores_follow_iglewicz_hoaglin() -> None:
    values = [0.050, 0.052, 0.049, 0.051, 0.048, 0.050, 0.120]
    scores = stats.modified_z_scores(values)
    center = float(np.median(values))
    mad = float(np.median(np.abs(np.array(values) - center)))
    expected = [0.6745 * (v - center) / mad for v in values]
    assert scores == pytest.approx(expected, rel=1e-12)
    assert [abs(s) > 3.5 for s in scores] == [False] * 6 + [True]


def test_modified_z_scores_fall_back_to_the_mean_absolute_deviation() -> None:
    values = [0.1, 0.1, 0.1, 0.1, 0.3]
    mean_ad = 0.2 / 5
    scores = stats.modified_z_scores(values)
    assert scores[-1] == pytest.approx(0.2 / (1.253314 * mean_ad), rel=1e-6)
    assert scores[:4] == (0.0,) * 4
    assert stats.modified_z_scores([0.2, 0.2, 0.2]) == (0.0, 0.0, 0.0)
    assert stats.modified_z_scores([]) == ()


def test_robust_z_score_against_a_reference() -> None:
    past = [0.030, 0.032, 0.029, 0.031, 0.030, 0.028, 0.033]
    center = float(np.median(past))
    mad = float(np.median(np.abs(np.array(past) - center)))
    assert stats.robust_z_score(0.05, past) == pytest.approx(0.6745 * (0.05 - center) / mad)
    assert stats.robust_z_score(0.2, [0.1] * 5) == math.inf
    assert stats.robust_z_score(0.1, [0.1] * 5) == 0.0


def _monte_carlo(
    arms: list[tuple[float, float]], draws: int = 400_000
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20240611)
    samples = np.array([rng.beta(a, b, draws) for a, b in arms])
    wins = np.bincount(samples.argmax(axis=0), minlength=len(arms)) / draws
    losses = samples.max(axis=0).mean() - samples.mean(axis=1)
    return wins, losses


PROB_BEST_CASES = [
    [(1.0, 1.0), (1.0, 1.0)],
    [(11.0, 91.0), (21.0, 81.0), (15.0, 90.0)],
    [(1.0, 1.0), (3.0, 1.0)],
    [(1.0, 1001.0), (4.0, 998.0)],
    [(31.0, 971.0), (41.0, 961.0), (36.0, 966.0), (29.0, 973.0)],
    [(1001.0, 99001.0), (1101.0, 98901.0), (1050.0, 99000.0)],
    [(501.0, 9501.0), (51.0, 951.0)],
    [(2.0, 50.0), (40_001.0, 960_001.0)],
]


@pytest.mark.parametrize("arms", PROB_BEST_CASES)
def test_probability_best_matches_monte_carlo(arms: list[tuple[float, float]]) -> None:
    result = stats.probability_best([stats.BetaPosterior(a, b) for a, b in arms])
    wins, losses = _monte_carlo(arms)
    np.testing.assert_allclose(result.probabilities, wins, atol=0.01)
    np.testing.assert_allclose(result.expected_loss, losses, rtol=0.02, atol=2e-5)
    assert math.fsum(result.probabilities) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("alpha", "beta", "arms"),
    [(1.0, 1.0, 2), (1.0, 1.0, 5), (3.0, 97.0, 3), (1.0, 1000.0, 4), (250.0, 9750.0, 6)],
)
def test_identical_arms_are_each_best_with_probability_one_over_k(
    alpha: float, beta: float, arms: int
) -> None:
    result = stats.probability_best([stats.BetaPosterior(alpha, beta)] * arms)
    assert result.probabilities == pytest.approx([1.0 / arms] * arms, abs=1e-9)


def _exact_two_arm(a1: int, b1: int, a2: int, b2: int) -> float:
    """P(θ₂ > θ₁) for integer a2 (Cook, "Exact calculation of beta inequalities", 2005)."""
    total = 0.0
    for i in range(a2):
        total += math.exp(
            stats.log_beta(a1 + i, b1 + b2)
            - math.log(b2 + i)
            - stats.log_beta(1 + i, b2)
            - stats.log_beta(a1, b1)
        )
    return total


@pytest.mark.parametrize(
    ("a1", "b1", "a2", "b2"),
    [(1, 1, 2, 1), (11, 91, 21, 81), (31, 971, 41, 961), (201, 9801, 231, 9771), (2, 3, 2, 3)],
)
def test_two_arm_probability_matches_the_closed_form(a1: int, b1: int, a2: int, b2: int) -> None:
    result = stats.probability_best([stats.BetaPosterior(a1, b1), stats.BetaPosterior(a2, b2)])
    assert result.probabilities[1] == pytest.approx(_exact_two_arm(a1, b1, a2, b2), abs=1e-8)


def test_expected_loss_of_two_uniform_arms_is_one_sixth() -> None:
    result = stats.probability_best([stats.BetaPosterior(1.0, 1.0)] * 2)
    assert result.expected_loss == pytest.approx((1 / 6, 1 / 6), abs=1e-9)


def test_probability_best_of_one_or_no_arm() -> None:
    assert stats.probability_best([]) == stats.BestArm((), ())
    assert stats.probability_best([stats.BetaPosterior(3.0, 4.0)]) == stats.BestArm((1.0,), (0.0,))


def test_beta_posterior_validates_itself() -> None:
    assert stats.BetaPosterior.from_counts(100, 7) == stats.BetaPosterior(8.0, 94.0)
    with pytest.raises(ValueError):
        stats.BetaPosterior(0.0, 1.0)
    with pytest.raises(ValueError):
        stats.BetaPosterior.from_counts(10, 11)
